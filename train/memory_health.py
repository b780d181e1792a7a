"""Memory health in metrics.jsonl: how the value rows of each memory layer are read during training.

Per memory layer i (block index), over the steps since the previous log line: `memory/{i}/rows_read` (fraction
of value rows read at least once), `memory/{i}/entropy` and `entropy_frac` (entropy of the reads over rows, in
nats and as a fraction of log(rows): 1 is uniform use), `memory/{i}/dead` (fraction of rows never read since the
run (re)started). A collapsed memory reads few rows with low entropy. Counted on this rank's tokens only.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from model.memory import MemoryLayer, SlotUsage

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def track_memory_usage(model: torch.nn.Module) -> Dict[int, SlotUsage]:
    """Turn counting on in every memory layer; {block index: its counter}."""
    usage = {}
    for name, module in model.named_modules():
        if isinstance(module, MemoryLayer):
            match = _BLOCK.search(name + ".")
            usage[int(match.group(1)) if match else len(usage)] = module.track_usage()
    return usage


def memory_health_metrics(usage: Dict[int, SlotUsage]) -> Dict[str, float]:
    """Flat metrics of every layer's window (starts a new window)."""
    out = {}
    for layer, counter in sorted(usage.items()):
        for key, value in counter.read().items():
            if key != "reads":
                out[f"memory/{layer}/{key}"] = value
    return out
