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


def _sq_norm(g: torch.Tensor) -> torch.Tensor:
    sq = _local(g).float().pow(2).sum()
    if DTensor is not None and isinstance(g, DTensor):
        for dim, placement in enumerate(g.placements):
            if placement.is_shard():
                torch.distributed.all_reduce(sq, group=g.device_mesh.get_group(dim))
    return sq


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack([_sq_norm(g) for g in grads]).sum().sqrt()
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            _local(g).mul_(scale.to(_local(g).dtype))
    return total
