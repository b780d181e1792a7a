"""Apply activation checkpointing, then torch.compile, then FSDP/memory sharding (torchtitan's order:
AC wraps the eager block, compile sees the wrapped block, FSDP shards the compiled modules' parameters)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .config import TrainConfig


class CheckpointedBlock(torch.nn.Module):
    """Recompute a block's activations in backward instead of storing them."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    for key, block in model.layers.named_children():
        model.layers.register_module(key, CheckpointedBlock(block))


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
