"""Apply torch.compile per block, then activation checkpointing around each compiled block, then FSDP/memory sharding.

Not torchtitan's AC -> compile order: dynamo cannot split a checkpointed region, so any graph break inside a
block under AC -> compile makes dynamo run that whole block eagerly. Memory blocks have one on purpose when the
values are split over ranks (the column-parallel lookup's collectives stay eager), so there AC -> compile would
lose the compiled memory block while compile -> AC keeps it and only recomputes it. Without a graph break the
two orders run at the same speed (BENCHMARKS.md: "activation checkpointing with compile"). The value tables'
own parallel plan comes with the model (model/value_parallel.py).
"""
from __future__ import annotations

import contextlib

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


def apply_compile(model: torch.nn.Module, scope: str = "blocks") -> None:
    """scope "blocks": each block on its own (small graphs compile fast, identical blocks share compiled code).
    "model": the whole forward in place (Module.compile: no wrapper module, so parameter names and checkpoint keys
    stay those of the plain model). fullgraph=False: the loss (ops.linear_cross_entropy), the reference memory
    backend's data-dependent ops and anything else dynamo cannot trace run eagerly between compiled parts."""
    if scope == "model":
        model.compile(fullgraph=False)
        return
    for key, block in model.layers.named_children():
        model.layers.register_module(key, torch.compile(block, fullgraph=False))


def eager_for_eval(cfg: TrainConfig):
    """Run compiled blocks eagerly inside this context (evaluation with a KV cache: generation).

    The blocks are compiled for training shapes; decoding passes the layer index and cache positions as Python
    ints, so each block would be recompiled per layer and step until torch.compile's recompile limit, after which
    it falls back to eager anyway, slowly. Evaluation is a small share of training: eager on purpose is the
    predictable choice.
    """
    if not cfg.train.compile:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def parallelize(model: torch.nn.Module, cfg: TrainConfig, rt) -> torch.nn.Module:
    if cfg.train.compile:
        apply_compile(model, cfg.train.compile_scope)  # scope "model" is traced at the first call, AC included
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)  # recomputation re-runs the compiled block
    if rt.world_size > 1:
        from model.value_parallel import parallelize_values

        from .distributed import apply_fsdp

        parallelize_values(model, rt.value_mesh, rt.memory_comm)  # first: FSDP leaves the split tables alone
        apply_fsdp(model, cfg, rt)
    return model
