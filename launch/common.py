"""Shared parsing for launchers: split launcher options from the trainer's own `key=value` arguments, and
validate both before anything is written or started."""
from __future__ import annotations

import shlex
import sys
from typing import Callable, Dict, List, Tuple

from model.cli_config import ConfigError, wants_help

# Launcher options that count something and must be at least 1.
_POSITIVE = ("nodes", "gpus_per_node", "cpus_per_task", "port")


def split_args(argv: List[str], launcher_keys: Dict[str, object]) -> Tuple[Dict[str, object], List[str]]:
    """Pull `key=value` pairs whose key is a launcher option out of argv; the rest go to the trainer.

    Values are converted to the type of the default in `launcher_keys` and checked (counts >= 1).
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
                raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}") from None
        else:
            rest.append(arg)
    for key in _POSITIVE:
        if key in opts and isinstance(opts[key], int) and opts[key] < 1:
            raise ConfigError(f"{key}: must be >= 1, got {opts[key]}")
    if "signal_lead_s" in opts and int(opts["signal_lead_s"]) < 0:
        raise ConfigError(f"signal_lead_s: must be >= 0, got {opts['signal_lead_s']}")
    return opts, rest


def trainer_config(train_args: List[str], launcher_keys: Dict[str, object], world_size: int = 0):
    """The trainer's validated config for these arguments (ConfigError naming the key otherwise), with the
    parallel layout checked against `world_size` when given. A top-level key the trainer does not know may be
    a misspelt launcher option: the message says so."""
    from train.config import TrainConfig, parse_cli
    from train.distributed import check_layout

    try:
        cfg = parse_cli(train_args)
        if world_size:
            check_layout(cfg, world_size)
    except ConfigError as e:
        key = str(e).split(":", 1)[0]
        if "." not in key and "[" not in key and key not in TrainConfig.__dataclass_fields__ and key != "config":
            raise ConfigError(f"{e} (neither a trainer key nor a launcher option; launcher options: "
                              f"{', '.join(launcher_keys)})") from None
        raise
    return cfg


def launcher_main(doc: str, defaults: Dict[str, object], body: Callable[[List[str]], int], argv=None) -> int:
    """--help prints `doc` and the options; a ConfigError is one `config error:` line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        opts = "\n".join(f"  {k}={v!r}" if isinstance(v, str) else f"  {k}={v}" for k, v in defaults.items())
        print(f"{doc}\nLauncher options and defaults (every other key=value goes to the trainer, "
              f"see python -m train --help):\n{opts}")
        return 0
    try:
        return body(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def join(cmd: List[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
