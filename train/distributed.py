"""Process group, device meshes and the parallel layout of the model.

Layout (world W = replicate * shard):
- dense parameters: FSDP2 `fully_shard` over the data-parallel mesh, 1-D (shard) or 2-D HSDP
  (replicate, shard);
- value tables: split by columns over memory-parallel groups of MP consecutive ranks, a DTensor on the
  mesh ("mp_replica", "mp") with placements (Replicate(), Shard(1)). Every rank still reads its own
  batch; the lookup exchanges indices and outputs within the MP group (ops/column_parallel.py). Value
  gradients are summed over the MP replicas once per optimizer step (none at all when MP = W).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig


def resolved_shard(cfg: TrainConfig, world_size: int) -> int:
    return cfg.dist.shard if cfg.dist.shard != -1 else max(1, world_size // cfg.dist.replicate)


def check_layout(cfg: TrainConfig, world_size: int) -> None:
    """Reject impossible layouts before any compute, naming the key."""
    d = cfg.dist
    if world_size % d.replicate:
        raise ConfigError(f"dist.replicate: {d.replicate} does not divide the world size {world_size}")
    shard = resolved_shard(cfg, world_size)
    if d.replicate * shard != world_size:
        raise ConfigError(
            f"dist.shard: replicate ({d.replicate}) x shard ({shard}) = {d.replicate * shard} "
            f"must equal the world size {world_size}"
        )
    if world_size % d.memory_parallel:
        raise ConfigError(f"dist.memory_parallel: {d.memory_parallel} does not divide the world size {world_size}")
    v_dim = cfg.model.memory.v_dim or cfg.model.dim
    if v_dim % d.memory_parallel:
        raise ConfigError(
            f"dist.memory_parallel: {d.memory_parallel} does not divide the value dim {v_dim} (model.memory.v_dim)"
        )


def init_distributed(rt, cfg: TrainConfig) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if rt.device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=int(os.environ.get("MNEMO_PG_TIMEOUT_MIN", 30))))
    rt.rank = dist.get_rank()
    rt.world_size = dist.get_world_size()
    rt.dp_rank, rt.dp_size = rt.rank, rt.world_size  # every rank reads distinct batches
    check_layout(cfg, rt.world_size)
    dev = rt.device.type
    shard = resolved_shard(cfg, rt.world_size)
    if cfg.dist.replicate > 1:
        rt.mesh = init_device_mesh(dev, (cfg.dist.replicate, shard), mesh_dim_names=("replicate", "shard"))
    else:
        rt.mesh = init_device_mesh(dev, (rt.world_size,), mesh_dim_names=("shard",))
    mp = cfg.dist.memory_parallel
    rt.value_mesh = init_device_mesh(dev, (rt.world_size // mp, mp), mesh_dim_names=("mp_replica", "mp"))
    from ops.column_parallel import CollectiveTimer

    rt.memory_comm = CollectiveTimer()


def _value_pools(model: torch.nn.Module):
    from model import ValuePool

    return [m for m in model.modules() if isinstance(m, ValuePool)]


def _memory_layers(model: torch.nn.Module):
    from model import MemoryLayer

    return [m for m in model.modules() if isinstance(m, MemoryLayer)]


def _column_parallel_lookup_fn(group, backend: str, timer):
    """The memory layers' lookup over this rank's column slice of a (Replicate, Shard(1)) value DTensor."""
    import ops
    from ops.column_parallel import column_parallel_lookup

    def local_lookup(indices, weights, values):
        return ops.memory_lookup(indices, weights, values, backend=backend)

    # Eager even inside a compiled block: the collectives break the graph anyway, and dynamo (torch 2.11) lost
    # the DTensor -> local conversion across those breaks and handed the kernel the DTensor itself.
    @torch.compiler.disable
    def lookup(indices, weights, values):
        # explicit grad placements: the local gradient is this rank's column slice of a replicated table
        local = values.to_local(grad_placements=values.placements) if hasattr(values, "to_local") else values
        return column_parallel_lookup(indices, weights, local, group, local_lookup, timer)

    return lookup


def shard_values(model: torch.nn.Module, rt) -> None:
    """Split every value table by columns over the MP dim of rt.value_mesh; wire the layers' lookups."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    for pool in _value_pools(model):
        # Every rank initialised the same full table under the same seed; each keeps its column slice.
        pool.weight = torch.nn.Parameter(
            distribute_tensor(pool.weight.detach(), rt.value_mesh, [Replicate(), Shard(1)])
        )
    group = rt.value_mesh.get_group("mp")
    for layer in _memory_layers(model):
        layer.lookup_fn = _column_parallel_lookup_fn(group, layer.backend, rt.memory_comm)


def apply_fsdp(model: torch.nn.Module, cfg: TrainConfig, rt) -> None:
    """Values: column-parallel DTensors (not FSDP). Everything else: FSDP2 per block, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shard_values(model, rt)
    values = {pool.weight for pool in _value_pools(model)}
    # cast_forward_inputs=False: the residual stream and the RoPE tables stay in their own dtype (fp32) between
    # blocks, as in the single-GPU run; autocast already runs the matmuls in bf16.
    reduce_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "param": rt.dtype}[cfg.dist.reduce_dtype]
    mp_policy = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    blocks = list(model.layers.children())
    k = cfg.dist.blocks_per_unit
    for unit in (blocks[i:i + k] for i in range(0, len(blocks), k)):
        own = {p for block in unit for p in block.parameters() if p in values}
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=rt.mesh, mp_policy=mp_policy, ignored_params=own or None,
                    reshard_after_forward=cfg.dist.reshard_after_forward)
    # the root (embeddings, final norm, output) is needed again first thing in backward: never resharded
    fully_shard(model, mesh=rt.mesh, mp_policy=mp_policy, ignored_params=values or None, reshard_after_forward=False)


@torch.no_grad()
def sync_value_grads(model: torch.nn.Module, rt) -> None:
    """Once per optimizer step: sum value gradients over the MP replicas and scale to the global mean.

    Each rank's slice gradient already covers all tokens of its MP group (the lookup gathered them);
    the replicas saw other data. The mean over all W ranks' losses needs the sum over replicas / W, done
    in place on the gradient shard (no table copy). No collective when MP = W (one replica).
    """
    replicas = rt.value_mesh.get_group("mp_replica")
    n_replicas = rt.value_mesh.size(0)
    for pool in _value_pools(model):
        g = pool.weight.grad
        if g is None:
            continue
        local = g.to_local() if hasattr(g, "to_local") else g
        if n_replicas > 1:
            with rt.memory_comm.measure(local.device):
                dist.all_reduce(local, group=replicas)
        local.mul_(1.0 / rt.world_size)
