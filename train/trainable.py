"""Which parameters a run trains (`train.trainable`); the rest are frozen (requires_grad False) and get no
optimizer state, so finetuning only the memory costs optimizer memory for the memory alone.

- all:    every parameter;
- memory: the memory layers' search and read: value table(s), sub-keys, query projections and query norms
          (the output-side swilu/value projections stay frozen, so the rest of the network sees the same
          mapping from a value to its output);
- values: the value table(s) only;
- ffn:    the SwiGLU blocks only (the dense counterpart of `memory` in knowledge-update comparisons).

`train.trainable_rows` (a file of value-row indices) further limits the value table's updates to those rows
(sparse memory finetuning: the rows most specific to new data; scripts/knowledge_update.py ranks them). The other
rows get zero gradient; AdamW then leaves them exactly unchanged (its moments stay zero; values have no decay by
default, and a row-limited run refuses value weight decay).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Set

import torch

from model import value_parameters
from model.ffn import FeedForward
from model.memory import memory_layers


def _values(model: torch.nn.Module) -> Set[torch.nn.Parameter]:
    return set(value_parameters(model))


def _memory(model: torch.nn.Module) -> Set[torch.nn.Parameter]:
    search = {p for layer in memory_layers(model) for p in layer.search_parameters()}
    return _values(model) | search


def _ffn(model: torch.nn.Module) -> Set[torch.nn.Parameter]:
    return {p for m in model.modules() if isinstance(m, FeedForward) for p in m.parameters()}


# mode -> the parameters it trains, found by module type (never by name)
SELECTORS: Dict[str, Callable[[torch.nn.Module], Set[torch.nn.Parameter]]] = {
    "all": lambda model: set(model.parameters()),
    "memory": _memory,
    "values": _values,
    "ffn": _ffn,
}


def apply_trainable(model: torch.nn.Module, which: str) -> List[str]:
    """Freeze every parameter `which` does not select; returns the names of the trainable ones.

    Call before parallelizing and before building the optimizer. Raises when `which` selects nothing in this
    model (e.g. `memory` on a dense model): a run that trains nothing is a mistake, not a no-op.
    """
    if which not in SELECTORS:
        raise ValueError(f"train.trainable: must be one of {', '.join(SELECTORS)}, got {which!r}")
    selected = SELECTORS[which](model)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(p in selected)
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"train.trainable: {which!r} selects no parameter of this model")
    return names


def load_rows(path: str, n_rows: int) -> torch.Tensor:
    """Row indices from a JSON list (or {"rows": [...]}) file, checked against the table size."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"train.trainable_rows: cannot read {path}: {e}") from None
    rows = data["rows"] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, int) and 0 <= r < n_rows for r in rows):
        raise ValueError(f"train.trainable_rows: {path} must hold a non-empty list of row indices in [0, {n_rows})")
    return torch.tensor(sorted(set(rows)), dtype=torch.long)


def restrict_value_rows(model: torch.nn.Module, path: str) -> int:
    """Only the listed rows of every trainable value table get gradient. Returns the number of rows."""
    tables = [p for p in value_parameters(model) if p.requires_grad]
    if not tables:
        raise ValueError("train.trainable_rows: no trainable value table (use train.trainable=values or memory)")
    rows = None
    for table in tables:
        rows = load_rows(os.fspath(path), table.shape[0])
        mask = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
        mask[rows.to(table.device)] = 1
        table.register_hook(lambda g, mask=mask: g * mask)
    return len(rows)
