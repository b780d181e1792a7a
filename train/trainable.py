"""Which parameters a run trains (`train.trainable`); the rest are frozen (requires_grad False) and get no
optimizer state, so finetuning only the memory costs optimizer memory for the memory alone.

- all:    every parameter;
- memory: the memory layers' search and read: value table(s), sub-keys, query projections and query norms
          (the output-side swilu/value projections stay frozen, so the rest of the network sees the same
          mapping from a value to its output);
- values: the value table(s) only;
- ffn:    the SwiGLU blocks only (the dense counterpart of `memory` in knowledge-update comparisons).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

_MEMORY_SEARCH = (".memory.keys1", ".memory.keys2", ".memory.query_proj.", ".memory.query_norm.")


def _is_values(name: str) -> bool:
    return name == "values.weight" or name.endswith(".values.weight")


def _is_memory(name: str) -> bool:
    return _is_values(name) or any(part in name for part in _MEMORY_SEARCH)


def _is_ffn(name: str) -> bool:
    return ".feed_forward." in name


SELECTORS: Dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "memory": _is_memory,
    "values": _is_values,
    "ffn": _is_ffn,
}


def apply_trainable(model: torch.nn.Module, which: str) -> List[str]:
    """Freeze every parameter `which` does not select; returns the names of the trainable ones.

    Call before parallelizing and before building the optimizer. Raises when `which` selects nothing in this
    model (e.g. `memory` on a dense model): a run that trains nothing is a mistake, not a no-op.
    """
    if which not in SELECTORS:
        raise ValueError(f"train.trainable: must be one of {', '.join(SELECTORS)}, got {which!r}")
    select = SELECTORS[which]
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(select(name))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"train.trainable: {which!r} selects no parameter of this model")
    return names
