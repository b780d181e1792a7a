"""Apply activation checkpointing, then torch.compile, then FSDP/memory sharding (torchtitan's order:
AC wraps the eager block, compile sees the wrapped block, FSDP shards the compiled modules' parameters)."""
from __future__ import annotations

import torch

from .config import TrainConfig


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them.

    torch's checkpoint_wrapper, not a wrapper of our own: its state-dict hooks (and DCP's get_state_dict) drop the
    wrapper from parameter names, so checkpoints keep the same keys with AC on or off (resume may toggle it,
    and eval loads them into a plain model).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for key, block in model.layers.named_children():
        model.layers.register_module(key, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))


def apply_compile(model: torch.nn.Module) -> None:
    # Per block: small graphs compile fast, and identical blocks share compiled code.
    for key, block in model.layers.named_children():
        model.layers.register_module(key, torch.compile(block, fullgraph=False))


def parallelize(model: torch.nn.Module, cfg: TrainConfig, rt) -> torch.nn.Module:
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    if rt.world_size > 1:
        from .distributed import apply_fsdp

        apply_fsdp(model, cfg, rt)
    return model
