"""Memory lookup over a value table split by columns across a memory-parallel (MP) process group.

Each of the MP ranks holds V[:, cols_r] (all N rows, D/MP columns) and its own tokens. One lookup:
  1. all-gather the group's slot indices and weights (tokens of every rank, in rank order);
  2. every rank reads its column slice for all of the group's tokens: [MP*T, D/MP];
  3. all-to-all returns each token's column slices to the rank that owns the token: [T, D].
Backward runs the same steps in reverse: the output gradient goes back by all-to-all, the weight gradient
(a partial sum over each rank's columns) is reduce-scattered to the token owners, and the value gradient
of the local slice covers the whole group's tokens. Replicas of the MP group (other data) still need their
value gradients summed: the trainer does that once per optimizer step, not once per layer use.

The collectives are plain `torch.distributed` calls (all_gather_into_tensor, all_to_all_single), which
both NCCL and gloo provide.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    """[T, ...] per rank -> [MP*T, ...] on every rank; backward sums each rank's rows back to its owner."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        # reduce-scatter written as all-to-all + local sum: gloo has no reduce_scatter_tensor
        parts = _all_to_all(grad, ctx.group).view(world, grad.shape[0] // world, *grad.shape[1:])
        return parts.sum(0), None


class _ReturnColumns(torch.autograd.Function):
    """[MP*T, D/MP] (this rank's columns for the group's tokens) -> [T, D] (all columns for own tokens)."""

    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        world = dist.get_world_size(group)
        t = y.shape[0] // world
        recv = _all_to_all(y, group).view(world, t, y.shape[1])  # recv[r] = rank r's columns of my tokens
        return recv.permute(1, 0, 2).reshape(t, world * y.shape[1])

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        t, d = grad.shape
        send = grad.view(t, world, d // world).permute(1, 0, 2).contiguous().view(world * t, d // world)
        return _all_to_all(send, ctx.group), None


def column_parallel_lookup(indices, weights, local_values, group, lookup_fn):
    """out[T, D] for this rank's tokens; `local_values` is this rank's [N, D/MP] slice.

    `lookup_fn(indices, weights, values)` is the single-device lookup (reference or kernel).
    """
    if dist.get_world_size(group) == 1:
        return lookup_fn(indices, weights, local_values)
    all_indices = _all_gather(indices, group)  # integer: no gradient
    all_weights = _GatherTokens.apply(weights, group)
    partial = lookup_fn(all_indices, all_weights, local_values)
    return _ReturnColumns.apply(partial, group)
