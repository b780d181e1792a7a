"""Process group, device meshes and the parallel layout of the model.

Layout (world W = replicate * shard):
- dense parameters: FSDP2 `fully_shard` over the data-parallel mesh, 1-D (shard) or 2-D HSDP
  (replicate, shard);
- value tables: split by columns over memory-parallel groups of MP consecutive ranks, on the mesh
  ("mp_replica", "mp") built here; the plan itself lives with the model (model/value_parallel.py).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself. The shard tensor itself, without DTensor's autograd-aware
    to_local(): for optimizer, gradient-norm and check code, which runs without autograd."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


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
    if world_size > 1 and cfg.train.compile and cfg.train.compile_scope == "model":
        raise ConfigError("train.compile_scope=model: one process only (FSDP and the column-parallel lookup are "
                          "compiled per block: train.compile_scope=blocks)")
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


def apply_fsdp(model: torch.nn.Module, cfg: TrainConfig, rt) -> None:
    """FSDP2 per block, then the root, on every parameter but the value tables (split by their own plan)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from model import value_parameters

    values = set(value_parameters(model))
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
