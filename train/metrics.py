"""What a training run reports: the console progress line, `metrics.jsonl` in the run directory, wandb when
enabled (the sinks are eval.sinks, shared with `python -m eval`), and the closing summary. Only rank 0 writes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from eval.sinks import WandbSink, print_line, write_jsonl


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_progress(rec: Dict[str, Any], total_steps: int) -> str:
    parts = [f"step {rec['step']}/{total_steps}", f"loss {rec['loss']:.4f}"]
    if "lr" in rec:
        parts.append(f"lr {rec['lr']:.2e}")
    if "grad_norm" in rec:
        gnorm = f"gnorm {rec['grad_norm']:.3f}"
        if "grad_norm/values" in rec:
            # significant digits: a value table's norm is often ~1e-4, which three decimals would show as 0.000
            gnorm += f" (values {rec['grad_norm/values']:.3g})"
        parts.append(gnorm)
    if "tokens_per_s" in rec:
        parts.append(f"{rec['tokens_per_s'] / 1000:.1f}k tok/s")
        if rec.get("tokens_per_s_per_device", rec["tokens_per_s"]) != rec["tokens_per_s"]:
            parts.append(f"{rec['tokens_per_s_per_device'] / 1000:.1f}k tok/s/device")
    if "mfu" in rec:
        parts.append(f"MFU {rec['mfu']:.1%}")
    if "peak_mem_gib" in rec:
        parts.append(f"peak mem {rec['peak_mem_gib']:.1f} GiB")
    if "memory_comm_ms" in rec:
        parts.append(f"memory comm {rec['memory_comm_ms']:.1f} ms/step ({rec['memory_comm_frac']:.0%})")
    if "eta_s" in rec:
        parts.append(f"eta {format_duration(rec['eta_s'])}")
    return " | ".join(parts)


SUMMARY_FILE = "summary.json"


def write_summary(run_dir: str, summary: Dict[str, Any]) -> None:
    """The finished run's summary, written last: its presence (at the configured step count) marks a finished run."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)


def format_summary(step: int, val_loss: float, entropy: float, skipped: Dict[str, int], eval_share: float) -> str:
    """The closing line: final validation loss against the unigram entropy, the bad records skipped, and the
    share of the run's time spent evaluating."""
    gap = 100 * (val_loss - entropy) / entropy
    side = f"{-gap:.1f}% below it" if gap <= 0 else f"{gap:.1f}% above it: not yet better than token frequencies"
    reasons = ", ".join(f"{k[len('skipped_'):]} {v}" for k, v in skipped.items() if k != "skipped")
    bad = f"{skipped.get('skipped', 0)} bad training records skipped" + (f" ({reasons})" if reasons else "")
    return (f"done: {step} steps | final val loss {val_loss:.4f} nats/token | unigram entropy {entropy:.4f} "
            f"(a model that learned only token frequencies) | {side} | {bad} | evaluation {100 * eval_share:.1f}% of "
            f"the time")


def truncate_after(path: str, step: int) -> None:
    """Drop records past `step` (written after the checkpoint we resume from) so each step appears once."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    with open(path, "w") as f:
        f.writelines(kept)


class MetricsLogger:
    """A training run's sinks (eval.sinks): records to `<run_dir>/metrics.jsonl` and wandb, lines to the console."""

    def __init__(self, run_dir: str, logging_cfg, config_dict: Dict[str, Any], enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        mode = logging_cfg.wandb if enabled else "disabled"
        self._wandb = WandbSink(mode, logging_cfg.project,
                                name=logging_cfg.run_name or os.path.basename(os.path.abspath(run_dir)),
                                config=config_dict, group=logging_cfg.group, dir=run_dir, resume="allow")

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        write_jsonl(self.path, [record])
        self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def print(self, line: str, force: Optional[bool] = None) -> None:
        if self.enabled:
            print_line(line)

    def close(self) -> None:
        self._wandb.close()
