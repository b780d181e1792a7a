"""Where results go: a jsonl file (one record per task per evaluation), a readable table, wandb when enabled."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

# Column order of the table; other metrics follow alphabetically.
_PREFERRED = ["n", "em", "f1", "answer_nll", "answer_nll_per_token", "acc", "acc_norm"]


def write_jsonl(path: str, records: List[Dict[str, Any]]) -> None:
    """Append records (dicts of plain values) to `path`, creating its directory."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(results: Dict[str, Dict[str, Any]]) -> str:
    """{task: {metric: value}} -> a fixed-width text table, one row per task."""
    if not results:
        return "(no tasks)"
    metrics = {m for r in results.values() for m in r}
    cols = [m for m in _PREFERRED if m in metrics] + sorted(metrics - set(_PREFERRED))
    rows = [["task"] + cols] + [[task] + [_fmt(r[c]) if c in r else "-" for c in cols] for task, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols) + 1)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def flatten(results: Dict[str, Dict[str, Any]], prefix: str = "eval") -> Dict[str, Any]:
    """{task: {metric: v}} -> {"eval/<task>/<metric>": v}: the keys logged with training metrics."""
    return {f"{prefix}/{task}/{m}": v for task, r in results.items() for m, v in r.items()}


class WandbSink:
    """Logs flat metrics to wandb; imports wandb only when mode is online/offline."""

    def __init__(self, mode: str = "disabled", project: str = "mnemo", name: Optional[str] = None, config: Optional[dict] = None):
        if mode not in ("disabled", "online", "offline"):
            raise ValueError(f"wandb: mode must be disabled, online or offline, got {mode!r}")
        self._run = None
        if mode != "disabled":
            import wandb  # optional dependency

            self._run = wandb.init(project=project, name=name, mode=mode, config=config or {}, job_type="eval")

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
