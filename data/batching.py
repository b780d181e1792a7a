"""Chunks of documents -> batches, each paired with the loader state and stats right after it.

Pure (no loader mutation), so it can run in a background thread; the loader adopts a batch's state only
when the batch is handed to the caller.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from data.packing import Packer


def batches(chunks: Iterable[list], batch_size: int, row_len: int, state: dict, stats: dict, train: bool,
            pin: bool) -> Iterator[Tuple[torch.Tensor, dict, dict]]:
    packer = Packer(row_len)
    rows: List[np.ndarray] = []
    for chunk in chunks:
        for pos, active, cursors, toks, reason, off in chunk:
            if reason is not None:
                stats[f"skipped_{reason}"] += 1
                continue
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
