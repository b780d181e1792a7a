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
