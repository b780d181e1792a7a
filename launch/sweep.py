r"""Grid sweeps: one run per combination of values, each in its own run directory.

    python -m launch.sweep config=configs/x.yaml \
        sweep.model.memory.n_keys=[256,512] "sweep.model.memory.layers=[[4],[4,12,20]]" \
        [launcher=local|torchrun|slurm] [nodes=.. gpus_per_node=..] [--dry-run] [key=value ...]

prints (with --dry-run) or runs one command per point, one after another (slurm: one job each). Each point
gets run_dir <base run_dir>/<short key>=<value>_..., so points never share checkpoints. Every point's trainer
config is checked before the first one starts.
"""
from __future__ import annotations

import itertools
import re
import subprocess
import sys
from typing import List, Tuple

from omegaconf import OmegaConf

from model.cli_config import ConfigError, parse_override

from .common import join, launcher_main, run_dir_of, split_args, trainer_config
from .slurm import DEFAULTS as SLURM_DEFAULTS
from .torchrun import torchrun_command

PREFIX = "sweep."


def parse_sweep(args: List[str]) -> Tuple[List[Tuple[str, list]], List[str]]:
    axes, rest = [], []
    for arg in args:
        if arg.startswith(PREFIX) and "=" in arg:
            key, value = arg[len(PREFIX):].split("=", 1)
            try:
                values = OmegaConf.to_container(parse_override(f"v={value}", f"{PREFIX}{key}=[1,2]"))["v"]
            except ConfigError as e:
                raise ConfigError(f"{PREFIX}{key}{str(e)[1:]}") from None
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{PREFIX}{key}: a sweep axis needs a non-empty list, e.g. {PREFIX}{key}=[1,2]")
            axes.append((key, values))
        else:
            rest.append(arg)
    if not axes:
        raise ConfigError("sweep: no sweep axes; pass sweep.<key>=[v1,v2,...]")
    return axes, rest


def _fmt(value) -> str:
    text = str(value).replace(" ", "")
    return re.sub(r"[^A-Za-z0-9.,_-]+", "", text)


def sweep_points(axes, base_args: List[str]) -> List[List[str]]:
    base_dir = run_dir_of(base_args)
    base_args = [a for a in base_args if not a.startswith("run_dir=")]
    points = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        overrides = [f"{k}={str(v).replace(' ', '')}" for (k, _), v in zip(axes, combo)]
        name = "_".join(f"{k.split('.')[-1]}={_fmt(v)}" for (k, _), v in zip(axes, combo))
        points.append(base_args + overrides + [f"run_dir={base_dir}/{name}"])
    return points


LAUNCHERS = ("local", "torchrun", "slurm")
DEFAULTS = dict(SLURM_DEFAULTS, launcher="local", nodes=1, gpus_per_node=1)


def _main(argv) -> int:
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    opts, rest = split_args(argv, DEFAULTS)
    if opts["launcher"] not in LAUNCHERS:
        raise ConfigError(f"launcher: must be one of {', '.join(LAUNCHERS)}, got {opts['launcher']!r}")
    axes, base = parse_sweep(rest)
    points = sweep_points(axes, base)
    world = 1 if opts["launcher"] == "local" else int(opts["nodes"]) * int(opts["gpus_per_node"])
    for i, args in enumerate(points, 1):  # all before the first starts: a bad one must not wait behind the others
        try:
            trainer_config(args, DEFAULTS, world)
        except ConfigError as e:
            raise ConfigError(f"{e} (sweep point {i} of {len(points)}: {join(args[-len(axes) - 1:-1])})") from None
    status = 0
    for args in points:
        if opts["launcher"] == "slurm":
            cmd = [sys.executable, "-m", "launch.slurm"] + [f"{k}={opts[k]}" for k in SLURM_DEFAULTS] + args
        elif opts["launcher"] == "torchrun":
            cmd = torchrun_command(args, nodes=int(opts["nodes"]), gpus_per_node=int(opts["gpus_per_node"]))
        else:
            cmd = [sys.executable, "-m", "train"] + args
        print(join(cmd), flush=True)
        if not dry_run:
            status = subprocess.call(cmd) or status
    return status


def main(argv=None) -> int:
    return launcher_main(__doc__, DEFAULTS, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
