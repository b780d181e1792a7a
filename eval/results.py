"""How evaluation results read: a table for the console, flat keys for the metric sinks (eval.sinks)."""
from __future__ import annotations

from typing import Any, Dict

# Column order of the table; other metrics follow alphabetically.
_PREFERRED = ["n", "em", "f1", "answer_nll", "answer_nll_per_token", "acc", "acc_norm"]


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
