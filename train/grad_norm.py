"""Global gradient-norm clipping over every parameter, values included, plain tensors or DTensors.

Parameters can live on different meshes (FSDP-sharded blocks, column-sharded values), which
torch.nn.utils.clip_grad_norm_ does not combine into one norm, so each gradient's squared norm is reduced
over the mesh dims it is sharded on, and the results summed. Replicated dims hold copies: not summed.
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None


def _local(g: torch.Tensor) -> torch.Tensor:
    return g._local_tensor if DTensor is not None and isinstance(g, DTensor) else g


def _reduce_groups(g: torch.Tensor):
    """The process groups of the mesh dims `g` is sharded on (its squared norm is a sum over them)."""
    if DTensor is None or not isinstance(g, DTensor):
        return ()
    return tuple(g.device_mesh.get_group(d) for d, p in enumerate(g.placements) if p.is_shard())


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # One all-reduce per distinct set of groups (not one per parameter: hundreds of tiny collectives).
    by_groups = {}
    for g in grads:
        by_groups.setdefault(_reduce_groups(g), []).append(_local(g))
    total = None
    for groups, locals_ in by_groups.items():
        sq = torch.stack(torch._foreach_norm(locals_, 2.0, dtype=torch.float32)).pow(2).sum()
        for group in groups:
            torch.distributed.all_reduce(sq, group=group)
        total = sq if total is None else total + sq
    total = total.sqrt()
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for dtype in {_local(g).dtype for g in grads}:
            torch._foreach_mul_([_local(g) for g in grads if _local(g).dtype == dtype], scale.to(dtype))
    return total
