"""Chunks of documents -> batches, each paired with the loader state and stats right after it.

Pure (no loader mutation), so it can run in a background thread; the loader adopts a batch's state only
when the batch is handed to the caller.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from data.packing import Packer
from data.sources import DataError

# A rank that went through this many epochs of a source (two whole ones) without one usable document of its
# own will never get one: an endless stream would spin forever, so it stops with an error instead.
_IDLE_EPOCHS = 3


def batches(chunks: Iterable[list], batch_size: int, row_len: int, state: dict, stats: dict, train: bool,
            pin: bool, label: str = "data") -> Iterator[Tuple[torch.Tensor, dict, dict]]:
    packer = Packer(row_len)
    rows: List[np.ndarray] = []
    idle_since = None  # the epochs of every source when this rank last got a usable document
    for chunk in chunks:
        for pos, active, cursors, toks, reason, off in chunk:
            if reason is not None:
                stats[f"skipped_{reason}"] += 1
                if idle_since is None:
                    idle_since = [c[0] for c in cursors]
                elif any(c[0] - e >= _IDLE_EPOCHS for c, e in zip(cursors, idle_since)):
                    raise DataError(f"{label}: no usable document in {_IDLE_EPOCHS - 1} whole passes over the "
                                    f"data (every record it owns is skipped: {_skipped_text(stats)})")
                continue
            idle_since = None
            stats["documents"] += off == 0
            if train:
                stats["epoch"] = max(stats["epoch"], cursors[0][0])
            packer.add(pos, active, cursors, toks, off)
            while True:
                rows.extend(packer.rows(batch_size - len(rows)))
                if len(rows) < batch_size:
                    break
                yield _emit(rows, stats, packer, state, pin)
                rows = []
    if rows:  # end of a finite pass: a last, smaller batch; a tail shorter than a row is dropped
        yield _emit(rows, stats, packer, state, pin)
    # The stream ended: final counts (bad records after the last batch included), and a state that
    # yields nothing more, so iterating a finished loader again neither repeats nor recounts.
    point = packer.resume_point()
    yield None, {**(advance(state, point) if point else state), "done": True}, dict(stats)


def _skipped_text(stats: dict) -> str:
    return ", ".join(f"{k[len('skipped_'):]} {v}" for k, v in stats.items() if k.startswith("skipped_") and v)


def _emit(rows, stats: dict, packer: Packer, state: dict, pin: bool):
    batch = torch.from_numpy(np.stack(rows).astype(np.int64))
    stats["batches"] += 1
    stats["tokens"] += batch.numel()
    return (batch.pin_memory() if pin else batch), advance(state, packer.resume_point()), dict(stats)


def advance(state: dict, point: Optional[tuple]) -> dict:
    """Stream state that resumes at the packer's resume point (pos, active, cursors, tokens used)."""
    pos, active, cursors, used = point
    partial = [[p, o] for p, o in state["partial"] if p > pos]
    return {"pos": pos, "active": active, "cursors": cursors, "base": state["base"],
            "world_size": state["world_size"], "skip": [p for p in state["skip"] if p > pos],
            "partial": [[pos, int(used)]] + partial}
