"""Global gradient-norm clipping over every parameter, values included, plain tensors or DTensors.

Parameters can live on different meshes (FSDP-sharded blocks, column-sharded values), which
torch.nn.utils.clip_grad_norm_ does not combine into one norm, so each gradient's squared norm is reduced
over the mesh dims it is sharded on, and the results summed. Replicated dims hold copies: not summed.

A value table's gradient written whole by its lookups' merged pass (ops/lookup_into_grad.py) comes with its squared
norm already summed (ops.grad_sum_of_squares): that gradient is not read again here.

The norm is also reported by part ("dense" and "values": the memory value tables), from the same squared sums:
the value table is updated sparsely and at its own rate, so its gradient scale is worth watching on its own. The value
tables are model.value_parameters (found by type).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

import ops
from model import value_parameters

from .distributed import local_tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None

PARTS = ("dense", "values")


def _reduce_groups(g: torch.Tensor):
    """The process groups of the mesh dims `g` is sharded on (its squared norm is a sum over them)."""
    if DTensor is None or not isinstance(g, DTensor):
        return ()
    return tuple(g.device_mesh.get_group(d) for d, p in enumerate(g.placements) if p.is_shard())


# Above this many elements a gradient's norm is one plain reduction: torch._foreach_norm reads a value table's
# gradient (10^9 elements) at well below the bandwidth a single reduction reaches (BENCHMARKS.md).
_LARGE = 1 << 26


def _sum_of_squares(tensors) -> torch.Tensor:
    """fp32 sum of the squared elements of `tensors`: one multi-tensor kernel per dtype for the many small ones, a
    plain reduction per large one."""
    small = [t for t in tensors if t.numel() < _LARGE]
    norms = [None] * len(small)
    # One call per dtype: a list of mixed dtypes (bf16 weights' gradients beside fp32 ones) falls off
    # torch._foreach_norm's multi-tensor path into one slow reduction per tensor (BENCHMARKS.md, "bf16 weights").
    for dtype in dict.fromkeys(t.dtype for t in small):
        at = [i for i, t in enumerate(small) if t.dtype == dtype]
        for i, norm in zip(at, torch._foreach_norm([small[i] for i in at], 2.0, dtype=torch.float32)):
            norms[i] = norm
    norms += [torch.linalg.vector_norm(t, 2.0, dtype=torch.float32) for t in tensors if t.numel() >= _LARGE]
    return torch.stack(norms).pow(2).sum()


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clip all gradients to a global norm of `max_norm` (0: no clipping).

    Returns the norm before clipping and its parts {"dense": ..., "values": ...} (a part without gradients is
    left out); the parts' squares sum to the total's.
    """
    values = set(value_parameters(model))
    with_grad = [(1 if p in values else 0, p) for p in model.parameters() if p.grad is not None]  # (part, param)
    if not with_grad:
        return torch.zeros(()), {}
    grads = [p.grad for _, p in with_grad]
    # One all-reduce per distinct set of groups (not one per parameter: hundreds of tiny collectives); the
    # parts' squared sums travel together in one vector. Squared norms known already are local tensors' (no groups).
    by_groups: Dict[tuple, Dict[int, list]] = {}
    known: Dict[int, list] = {}
    for part, p in with_grad:
        sq = ops.grad_sum_of_squares(p)
        if sq is not None:
            known.setdefault(part, []).append(sq)
        else:
            by_groups.setdefault(_reduce_groups(p.grad), {}).setdefault(part, []).append(local_tensor(p.grad))
    part_sq = None
    if known:
        device = next(iter(known.values()))[0].device
        part_sq = torch.zeros(len(PARTS), dtype=torch.float32, device=device)
        for part, sums in known.items():
            part_sq[part] = torch.stack(sums).sum()
    for groups, by_part in by_groups.items():
        sq = None
        for part, locals_ in by_part.items():
            s = _sum_of_squares(locals_)
            if sq is None:
                sq = torch.zeros(len(PARTS), dtype=torch.float32, device=s.device)
            sq[part] = s
        for group in groups:
            torch.distributed.all_reduce(sq, group=group)
        part_sq = sq if part_sq is None else part_sq + sq
    total = part_sq.sum().sqrt()
    present = {part for part, _ in with_grad}
    parts = {PARTS[i]: part_sq[i].sqrt() for i in sorted(present)}
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for dtype in {local_tensor(g).dtype for g in grads}:
            torch._foreach_mul_([local_tensor(g) for g in grads if local_tensor(g).dtype == dtype], scale.to(dtype))
    return total, parts
