"""Where metric records go: a jsonl file, the console, wandb. One implementation for training
(train.metrics.MetricsLogger) and evaluation (`python -m eval`).

It lives in eval because eval is the lowest package that both use for metrics (train imports eval, never the
other way). wandb is an optional dependency: imported only when a sink is created with mode online/offline.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, get_args

from model.cli_config import WandbMode

WANDB_MODES = get_args(WandbMode)


def write_jsonl(path: str, records: Iterable[Dict[str, Any]]) -> None:
    """Append records (dicts of plain values), one JSON object per line, to `path`, creating its directory.

    The file is opened per call, so a record is on disk once the call returns and a crash loses nothing already
    logged (a resumed run trims what follows its checkpoint: train.metrics.truncate_after)."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def print_line(line: str) -> None:
    """The console sink: one line, flushed at once so a log that is tailed (or a job's output file) is current."""
    print(line, flush=True)


class WandbSink:
    """Logs records to a wandb run; `mode` disabled creates nothing and does not import wandb."""

    def __init__(self, mode: str = "disabled", project: str = "mnemo", name: Optional[str] = None,
                 config: Optional[dict] = None, **init_kwargs):
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb: mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self._run = None
        if mode != "disabled":
            import wandb  # optional dependency: only when asked for

            self._run = wandb.init(project=project, name=name, mode=mode, config=config or {}, **init_kwargs)

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
