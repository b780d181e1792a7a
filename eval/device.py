"""Small helpers shared by the scorers: where the model lives, its context length, cross-rank sums (autocast:
model/device.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def max_seq_len(model: torch.nn.Module) -> Optional[int]:
    """The model's RoPE/context limit from its ModelConfig, when it exposes one."""
    for attr in ("cfg", "config", "args"):
        cfg = getattr(model, attr, None)
        n = getattr(cfg, "max_seq_len", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank: ranks must agree on when to stop issuing forwards, because a
    sharded model (FSDP, memory parallel) runs collectives inside forward."""
    if not distributed():
        return flag
    t = torch.tensor([0 if flag else 1], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def all_max(*values: int, device: torch.device):
    """Elementwise max over ranks of a few ints (one int in -> one int out)."""
    if distributed():
        t = torch.tensor(values, device=device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        values = tuple(int(v) for v in t.tolist())
    return values[0] if len(values) == 1 else tuple(values)
