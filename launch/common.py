"""Shared parsing for launchers: split launcher options from the trainer's own `key=value` arguments."""
from __future__ import annotations

import shlex
from typing import Dict, List, Tuple

from omegaconf import OmegaConf


def split_args(argv: List[str], launcher_keys: Dict[str, object]) -> Tuple[Dict[str, object], List[str]]:
    """Pull `key=value` pairs whose key is a launcher option out of argv; the rest go to the trainer.

    Values are converted to the type of the default in `launcher_keys`.
    """
    opts = dict(launcher_keys)
    rest = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in launcher_keys:
            default = launcher_keys[key]
            try:
                opts[key] = type(default)(value) if default is not None else value
            except ValueError:
                raise SystemExit(f"{key}: expected {type(default).__name__}, got {value!r}") from None
        else:
            rest.append(arg)
    return opts, rest


def run_dir_of(train_args: List[str]) -> str:
    """The run directory the trainer will use: the config file's `run_dir` with overrides applied."""
    conf = OmegaConf.create({"run_dir": "runs/default"})
    for arg in train_args:
        if arg.startswith("config="):
            conf = OmegaConf.merge(conf, OmegaConf.load(arg.split("=", 1)[1]))
    dot = [a for a in train_args if a.startswith("run_dir=")]
    if dot:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(dot))
    return str(conf.run_dir)


def join(cmd: List[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
