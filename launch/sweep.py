"""Sweeps: one run per point, each in its own run directory named after what differs.

    python -m launch.sweep sweep=configs/sweeps/memory_size.yaml [launcher=local|torchrun|slurm] [--dry-run] \
        [nodes=.. gpus_per_node=.. time=.. ...] [key=value ...] [summarize]
    python -m launch.sweep config=configs/x.yaml sweep.model.memory.n_keys=[256,512] [...]

A sweep file (see configs/sweeps/):
    name: memory_size                     # wandb group of its runs; default run_dir runs/sweeps/<name>
    config: configs/memory_373m.yaml      # the trainer config every point starts from
    run_dir: runs/sweeps/memory_size      # optional
    overrides: {train.steps: 20000}       # optional: every point
    grid: {model.memory.n_keys: [256, 512, 1024]}     # every combination of these values
    points:                               # and/or explicit points (each one crossed with the grid)
      - {model.memory.layers: [12]}
      - {model.memory.layers: [], model.memory.every: 4}
`sweep.<key>=[...]` arguments add grid axes (or replace the file's); `config=`, `run_dir=` and other `key=value` arguments override the
file's for every point. A point's run directory is <run_dir>/<name>, e.g. `n_keys=512,layers=4-12-20`.

Every point's trainer config is validated before anything starts or is written (`config error: <point>: ...`,
exit 2). Launchers:
  local     runs the points one after another on this machine; finished points (the trainer wrote summary.json at
            the configured step count) are skipped, unfinished ones resume from their newest checkpoint
  torchrun  the same, each point under torchrun (nodes, gpus_per_node)
  slurm     writes <run_dir>/sweep.sbatch, ONE job array with a task per point (--array=0-(N-1)), each task
            requeued on preemption like launch.slurm's jobs, and submits it with sbatch
`--dry-run` prints the points, their status and every command (or the sbatch script) and writes nothing.
`summarize` writes the sweep's table and plots (launch/summarize.py) into <run_dir> instead of running.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from model.cli_config import ConfigError, parse_override

from .common import join, launcher_main, split_args, trainer_config
from .slurm import DEFAULTS as SLURM_DEFAULTS
from .slurm import sbatch_array_script
from .torchrun import torchrun_command

PREFIX = "sweep."
LAUNCHERS = ("local", "torchrun", "slurm")
_FILE_KEYS = {"name", "config", "run_dir", "overrides", "grid", "points"}


class SweepError(ConfigError):
    pass


@dataclass
class Point:
    name: str
    values: Dict[str, Any]  # the swept keys' values at this point
    args: List[str]  # the trainer's arguments
    run_dir: str
    steps: Optional[int] = None  # train.steps, known once validated


@dataclass
class Sweep:
    name: str
    run_dir: str
    points: List[Point] = field(default_factory=list)


def override_text(value: Any) -> str:
    """A value as the trainer's `key=value` parser (YAML) reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _name_text(value: Any) -> str:
    """A value as it appears in a point name: lists joined by '-', filesystem-safe characters only."""
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "-".join(_name_text(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(value)).strip("_") or "_"


def _short_keys(keys: List[str]) -> Dict[str, str]:
    """Each dotted key's shortest suffix that no other key shares: n_keys, memory.layers, ..."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if not any(o != key and (o == short or o.endswith("." + short)) for o in keys):
                break
        out[key] = short
    return out


def point_names(points: List[Dict[str, Any]]) -> List[str]:
    """Names that say what differs between the points (keys with one value everywhere are left out)."""
    keys: List[str] = []
    for p in points:
        keys += [k for k in p if k not in keys]

    def same_everywhere(key):
        return len({json.dumps(p.get(key, "<unset>"), sort_keys=True) for p in points}) == 1

    varying = [k for k in keys if not same_everywhere(k)] if len(points) > 1 else keys
    short = _short_keys(varying)
    names = [",".join(f"{short[k]}={_name_text(p[k])}" for k in varying if k in p) or "base" for p in points]
    if len(set(names)) < len(names):  # distinct values that read the same once made filesystem-safe
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    return names


def _as_points(raw, source: str) -> List[Dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise SweepError(f"{source}: points: a list of {{key: value}} mappings")
    return [dict(p) for p in raw]


def _as_grid(raw, source: str) -> List[Tuple[str, list]]:
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: grid: a mapping of key: [values]")
    axes = []
    for key, values in raw.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{source}: grid.{key}: a non-empty list of values")
        axes.append((str(key), values))
    return axes


def load_sweep_file(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise SweepError(f"sweep: file not found: {path}")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise SweepError(f"sweep: cannot parse {path}: {e}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"sweep: {path}: a mapping with grid and/or points")
    unknown = set(spec) - _FILE_KEYS
    if unknown:
        raise SweepError(f"sweep: {path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                         f"{', '.join(sorted(_FILE_KEYS))}")
    if not spec.get("grid") and not spec.get("points"):
        raise SweepError(f"sweep: {path}: needs grid and/or points")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return spec


def parse_sweep(args: List[str]) -> Tuple[List[Tuple[str, list]], List[str]]:
    """Command-line grid axes (`sweep.<key>=[v1,v2]`) and the other arguments."""
    axes, rest = [], []
    for arg in args:
        if arg.startswith(PREFIX) and "=" in arg:
            key, value = arg[len(PREFIX):].split("=", 1)
            try:
                values = OmegaConf.to_container(parse_override(f"v={value}", f"{PREFIX}{key}=[1,2]"))["v"]
            except ConfigError as e:
                raise SweepError(f"{PREFIX}{key}{str(e)[1:]}") from None
            if not isinstance(values, list) or not values:
                raise SweepError(f"{PREFIX}{key}: a sweep axis needs a non-empty list, e.g. {PREFIX}{key}=[1,2]")
            axes.append((key, values))
        else:
            rest.append(arg)
    return axes, rest


def build_sweep(axes: List[Tuple[str, list]], args: List[str], spec: Optional[Dict[str, Any]] = None) -> Sweep:
    """The points of a sweep file (optional) plus command-line axes, with the remaining trainer `args`."""
    spec = spec or {}
    source = spec.get("name", "sweep")
    grid = dict(_as_grid(spec["grid"], source) if spec.get("grid") else [])
    grid.update(axes)  # a command-line axis replaces the file's axis of the same key
    axes = list(grid.items())
    explicit = _as_points(spec["points"], source) if spec.get("points") else [{}]
    if not axes and explicit == [{}]:
        raise SweepError("no sweep points: pass sweep=FILE or sweep.<key>=[v1,v2,...]")
    combos = [dict(zip([k for k, _ in axes], c)) for c in itertools.product(*[v for _, v in axes])]
    values = [{**g, **p} for p in explicit for g in combos]  # names read grid keys first

    cli_config = [a for a in args if a.startswith("config=")]
    cli_run_dir = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    rest = [a for a in args if not a.startswith(("config=", "run_dir="))]
    base = cli_config[-1:] or ([f"config={spec['config']}"] if spec.get("config") else [])
    if cli_run_dir:
        root = cli_run_dir[-1]
    elif spec.get("run_dir"):
        root = str(spec["run_dir"])
    elif spec:
        root = os.path.join("runs", "sweeps", str(spec["name"]))
    else:  # the run_dir of the preset (configs/tiny.yaml without config=)
        from train.config import parse_cli

        root = str(parse_cli(base).run_dir)
    name = str(spec.get("name") or os.path.basename(os.path.normpath(root)))
    fixed = [f"{k}={override_text(v)}" for k, v in (spec.get("overrides") or {}).items()] + rest
    if not any(a.startswith("logging.group=") for a in fixed):
        fixed.append(f"logging.group={name}")  # the sweep's wandb runs side by side

    sweep = Sweep(name=name, run_dir=root)
    seen: Dict[str, int] = {}
    for i, (pname, vals) in enumerate(zip(point_names(values), values)):
        key = json.dumps(vals, sort_keys=True)
        if key in seen:
            raise SweepError(f"sweep: points {seen[key]} and {i} are the same: {vals}")
        seen[key] = i
        run_dir = os.path.join(root, pname)
        point_args = base + fixed + [f"{k}={override_text(v)}" for k, v in vals.items()] + [f"run_dir={run_dir}"]
        sweep.points.append(Point(name=pname, values=vals, args=point_args, run_dir=run_dir))
    return sweep


def sweep_points(axes, base_args: List[str]) -> List[List[str]]:
    """The trainer arguments of each point of a command-line grid (run_dir last)."""
    return [p.args for p in build_sweep(axes, base_args).points]


def validate(sweep: Sweep, launcher_keys: Dict[str, Any], world_size: int = 0) -> List[str]:
    """Load every point's trainer config as the trainer will (and its layout for `world_size` ranks); returns the
    errors (`<point>: <key>: ...`)."""
    errors = []
    for point in sweep.points:
        try:
            point.steps = trainer_config(point.args, launcher_keys, world_size).train.steps
        except ConfigError as e:
            errors.append(f"{point.name}: {e}")
    return errors


def _status_line(point: Point) -> Tuple[bool, str]:
    from .summarize import run_status

    state, step = run_status(point.run_dir, point.steps)
    if state == "finished":
        return True, f"finished ({step}/{point.steps} steps): skipped"
    if state == "resumable":
        return False, f"resumes from step {step}/{point.steps}"
    return False, "starts"


def run_sequential(sweep: Sweep, opts: Dict[str, Any], dry_run: bool) -> int:
    status = 0
    for i, point in enumerate(sweep.points):
        done, what = _status_line(point)
        print(f"[{i + 1}/{len(sweep.points)}] {point.name}: {what}", flush=True)
        if done:
            continue
        if opts["launcher"] == "torchrun":
            cmd = torchrun_command(point.args, nodes=int(opts["nodes"]), gpus_per_node=int(opts["gpus_per_node"]),
                                   python=sys.executable)
        else:
            cmd = [sys.executable, "-m", "train"] + point.args
        print(join(cmd), flush=True)
        if dry_run:
            continue
        rc = subprocess.call(cmd)
        if rc:
            print(f"{point.name}: exit status {rc}", flush=True)
            status = status or rc
        elif not _status_line(point)[0]:
            # The trainer saved and exited before its last step: it was asked to stop (SIGTERM/SIGUSR1), so the
            # sweep stops too; running the same command again resumes here.
            print(f"{point.name}: stopped before its last step; rerun the sweep to resume", flush=True)
            return 1
    return status


def submit_array(sweep: Sweep, opts: Dict[str, Any], dry_run: bool) -> int:
    opts = dict(opts)
    if opts["job_name"] == SLURM_DEFAULTS["job_name"]:
        opts["job_name"] = f"{SLURM_DEFAULTS['job_name']}-{sweep.name}"
    script = sbatch_array_script([(p.name, p.args) for p in sweep.points], opts, sweep.run_dir)
    if dry_run:
        print(script)
        return 0
    os.makedirs(sweep.run_dir, exist_ok=True)
    path = os.path.join(sweep.run_dir, "sweep.sbatch")
    with open(path, "w") as f:
        f.write(script)
    print(f"wrote {path}: {len(sweep.points)} array tasks", flush=True)
    return subprocess.call(["sbatch", path])


def summarize_sweep(sweep: Sweep) -> int:
    from .summarize import PLOTS, load_run, summarize

    runs = [load_run(p.run_dir, name=p.name, planned=p.values) for p in sweep.points]
    print(summarize(runs, sweep.run_dir), end="")
    print(f"wrote {sweep.run_dir}/summary.csv, summary.md, {', '.join(PLOTS)}")
    return 0


LAUNCHER_KEYS = dict(SLURM_DEFAULTS, launcher="local", nodes=1, gpus_per_node=1, array_parallel=0)


def _main(argv: List[str]) -> int:
    dry_run = "--dry-run" in argv
    do_summarize = "summarize" in argv
    argv = [a for a in argv if a not in ("--dry-run", "summarize")]
    opts, rest = split_args(argv, LAUNCHER_KEYS)
    if opts["launcher"] not in LAUNCHERS:
        raise ConfigError(f"launcher: must be one of {', '.join(LAUNCHERS)}, got {opts['launcher']!r}")
    files = [a.split("=", 1)[1] for a in rest if a.startswith("sweep=")]
    rest = [a for a in rest if not a.startswith("sweep=")]
    bad = [a for a in rest if "=" not in a]
    if bad:
        raise ConfigError(f"{bad[0]}: expected key=value, sweep=FILE, sweep.<key>=[...], summarize or --dry-run")
    axes, rest = parse_sweep(rest)
    sweep = build_sweep(axes, rest, load_sweep_file(files[-1]) if files else None)
    if do_summarize:
        return summarize_sweep(sweep)
    world = 1 if opts["launcher"] == "local" else int(opts["nodes"]) * int(opts["gpus_per_node"])
    errors = validate(sweep, LAUNCHER_KEYS, world)  # all before the first starts: a bad one must not wait behind others
    if errors:
        more = f" (and {len(errors) - 1} more bad points: {', '.join(e.split(':', 1)[0] for e in errors[1:])})"
        raise ConfigError(errors[0] + (more if len(errors) > 1 else ""))
    # (on stderr for slurm, so that --dry-run's stdout is the script alone)
    print(f"sweep {sweep.name}: {len(sweep.points)} points under {sweep.run_dir}", flush=True,
          file=sys.stderr if opts["launcher"] == "slurm" else sys.stdout)
    if opts["launcher"] == "slurm":
        return submit_array(sweep, opts, dry_run)
    status = run_sequential(sweep, opts, dry_run)
    if not dry_run:
        summarize_sweep(sweep)
    return status


def main(argv=None) -> int:
    return launcher_main(__doc__, LAUNCHER_KEYS, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
