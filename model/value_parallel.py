"""Memory parallelism: the parallel plan of the value tables, applied by the trainer's parallelize().

Every value table is split by columns over memory-parallel (MP) groups of ranks: a DTensor on a 2-D mesh
("mp_replica", "mp") with placements (Replicate(), Shard(1)). Each rank still reads its own batch; a lookup exchanges
indices and outputs within its MP group (ops/column_parallel.py). The MP groups replicate the table and see other
data, so value gradients are summed over them once per optimizer step (sync_value_grads; none at all when one MP
group spans every rank). Dense parameters are not this plan's business (the trainer shards them with FSDP).

The plan lives with the model, as a torch ParallelStyle would: parallelize_values() hands it to each ValuePool (which
holds the sharded table) and each MemoryLayer (which reads through it); nothing outside model/ touches their
tables. Parameter names stay as they are, so checkpoints keep their keys with or without the plan.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

import ops
from ops.column_parallel import CollectiveTimer, column_parallel_lookup

from .memory import memory_layers, value_pools

MESH_DIMS = ("mp_replica", "mp")
REDUCE_BLOCK_ELEMENTS = 1 << 26  # 256 MiB of fp32 per block when a low-precision value gradient is reduced


class ColumnParallelValues:
    """Value tables split by columns over the "mp" dim of `mesh`, replicated over its "mp_replica" dim.

    `timer` (optional) adds up the time of the plan's collectives, lookups and gradient sums alike.
    """

    def __init__(self, mesh, timer: Optional[CollectiveTimer] = None):
        if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
            raise ValueError(f"ColumnParallelValues: the mesh dims must be {MESH_DIMS}, got {mesh.mesh_dim_names}")
        self.mesh = mesh
        self.timer = timer
        self.group = mesh.get_group("mp")

    def shard(self, pool: nn.Module) -> None:
        """Keep this rank's column slice of the pool's table (every rank initialised the same full table)."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        pool.weight = nn.Parameter(distribute_tensor(pool.weight.detach(), self.mesh, [Replicate(), Shard(1)]))
        pool.plan = self

    # Eager even inside a compiled block: the collectives break the graph anyway, and dynamo (torch 2.11) lost the
    # DTensor -> local conversion across those breaks and handed the kernel the DTensor itself.
    @torch.compiler.disable
    def lookup(self, indices: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, backend: str) -> torch.Tensor:
        """The memory lookup of this rank's tokens over a table sharded by this plan."""
        # explicit grad placements: the local gradient is this rank's column slice of a replicated table
        local = values.to_local(grad_placements=values.placements) if hasattr(values, "to_local") else values

        def local_lookup(i, w, v):
            return ops.memory_lookup(i, w, v, backend=backend)

        return column_parallel_lookup(indices, weights, local, self.group, local_lookup, self.timer)

    @torch.no_grad()
    def reduce_grad(self, grad: torch.Tensor) -> None:
        """Sum a value gradient over the MP replicas and scale it to the mean over all ranks, in place.

        Each rank's slice gradient already covers all tokens of its MP group (the lookup gathered them); the
        replicas saw other data. The mean over all ranks' losses needs the sum over replicas / world size, done on
        the gradient shard (no table copy). No collective with one replica.
        """
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        if self.mesh.size(0) == 1:
            local.mul_(1.0 / self.mesh.size())
            return
        group = self.mesh.get_group("mp_replica")
        with self.timer.measure(local.device) if self.timer is not None else contextlib.nullcontext():
            if local.dtype == torch.float32:
                dist.all_reduce(local, group=group)
                local.mul_(1.0 / self.mesh.size())
                return
            # A bf16 table's gradient: summed in fp32 (a ring all-reduce in bf16 rounds at every hop) and rounded
            # once, a block of rows at a time so that the fp32 copy stays small beside the table.
            rows = max(1, REDUCE_BLOCK_ELEMENTS // max(1, local.shape[-1]))
            for block in local.split(rows):
                acc = block.float()
                dist.all_reduce(acc, group=group)
                block.copy_(acc.mul_(1.0 / self.mesh.size()))


def parallelize_values(model: nn.Module, mesh, timer: Optional[CollectiveTimer] = None) -> ColumnParallelValues:
    """Split every value table of `model` by columns over `mesh` and make every memory layer read through the split.

    Call after compile and activation checkpointing are applied and before FSDP (which must leave the tables alone:
    pass value_parameters(model) as its ignored parameters)."""
    plan = ColumnParallelValues(mesh, timer)
    for pool in value_pools(model):
        plan.shard(pool)
    for layer in memory_layers(model):
        layer.value_plan = plan
    return plan


def sync_value_grads(model: nn.Module) -> None:
    """Once per optimizer step, after the last backward: each split table's gradient summed over its replicas."""
    for pool in value_pools(model):
        if pool.plan is not None and pool.weight.grad is not None:
            pool.plan.reduce_grad(pool.weight.grad)
