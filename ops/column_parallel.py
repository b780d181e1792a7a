"""Memory lookup over a value table split by columns across a memory-parallel (MP) process group.

Each of the MP ranks holds V[:, cols_r] (all N rows, D/MP columns) and its own tokens. One lookup:
  1. all-gather the group's slot indices and weights (tokens of every rank, in rank order);
  2. every rank reads its column slice for all of the group's tokens: [MP*T, D/MP];
  3. all-to-all returns each token's column slices to the rank that owns the token: [T, D].
Backward runs the same steps in reverse: the output gradient goes back by all-to-all, the weight gradient
(a partial sum over each rank's columns) is reduce-scattered to the token owners, and the value gradient
of the local slice covers the whole group's tokens. Replicas of the MP group (other data) still need their
value gradients summed: the caller does that once per optimizer step, not once per layer use.

The collectives are plain `torch.distributed` calls (all_gather_into_tensor, all_to_all_single), which
both NCCL and gloo provide. A CollectiveTimer, when given, adds up the time they take.
"""
from __future__ import annotations

import contextlib
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


class CollectiveTimer:
    """Time spent in collectives, forward and backward, summed until read.

    On CUDA each collective is bracketed by two events on the current stream. A blocking collective makes the
    current stream wait for the communication stream, so the span covers the transfer and any wait for slower
    ranks, and recording costs no host sync: the events are read only when `read_ms` is called (at logging,
    where the loop synchronises anyway). On CPU (gloo) collectives are blocking calls: wall clock.
    """

    def __init__(self):
        self._events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host_s = 0.0
        self.calls = 0

    @contextlib.contextmanager
    def measure(self, device: torch.device):
        self.calls += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_s += time.perf_counter() - t0

    def read_ms(self) -> float:
        """Milliseconds spent since the last read; resets the sum."""
        total = self._host_s * 1e3
        for start, end in self._events:
            end.synchronize()
            total += start.elapsed_time(end)
        self._events.clear()
        self._host_s, self.calls = 0.0, 0
        return total


def _timed(timer: Optional[CollectiveTimer], x: torch.Tensor):
    return timer.measure(x.device) if timer is not None else contextlib.nullcontext()


def _all_to_all(x: torch.Tensor, group, timer: Optional[CollectiveTimer] = None) -> torch.Tensor:
    out = torch.empty_like(x)
    with _timed(timer, x):
        dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def _all_gather(x: torch.Tensor, group, timer: Optional[CollectiveTimer] = None) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    with _timed(timer, x):
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    """[T, ...] per rank -> [MP*T, ...] on every rank; backward sums each rank's rows back to its owner."""

    @staticmethod
    def forward(ctx, x, group, timer):
        ctx.group, ctx.timer = group, timer
        return _all_gather(x, group, timer)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        # reduce-scatter written as all-to-all + local sum: gloo has no reduce_scatter_tensor
        parts = _all_to_all(grad, ctx.group, ctx.timer).view(world, grad.shape[0] // world, *grad.shape[1:])
        return parts.sum(0), None, None


class _ReturnColumns(torch.autograd.Function):
    """[MP*T, D/MP] (this rank's columns for the group's tokens) -> [T, D] (all columns for own tokens)."""

    @staticmethod
    def forward(ctx, y, group, timer):
        ctx.group, ctx.timer = group, timer
        world = dist.get_world_size(group)
        t = y.shape[0] // world
        recv = _all_to_all(y, group, timer).view(world, t, y.shape[1])  # recv[r] = rank r's columns of my tokens
        return recv.permute(1, 0, 2).reshape(t, world * y.shape[1])

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        t, d = grad.shape
        send = grad.view(t, world, d // world).permute(1, 0, 2).contiguous().view(world * t, d // world)
        return _all_to_all(send, ctx.group, ctx.timer), None, None


def column_parallel_lookup(indices, weights, local_values, group, lookup_fn, timer: Optional[CollectiveTimer] = None):
    """out[T, D] for this rank's tokens; `local_values` is this rank's [N, D/MP] slice.

    `lookup_fn(indices, weights, values)` is the single-device lookup (reference or kernel).
    """
    if dist.get_world_size(group) == 1:
        return lookup_fn(indices, weights, local_values)
    all_indices = _all_gather(indices, group, timer)  # integer: no gradient
    all_weights = _GatherTokens.apply(weights, group, timer)
    partial = lookup_fn(all_indices, all_weights, local_values)
    return _ReturnColumns.apply(partial, group, timer)
