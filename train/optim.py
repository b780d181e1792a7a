"""AdamW with explicit parameter groups and a warmup + cosine schedule.

Groups are decided per parameter, in the model's registration order (never by sorting or grouping
unsorted iterables), so the grouping is stable across runs and checkpoints:
- "values": the memory value table(s) (model.value_parameters), at `value_lr` (default value_lr_mult * lr) with
  `value_weight_decay`;
- "no_decay": norm weights and biases (1-D parameters), with `norm_bias_weight_decay`;
- "decay": everything else, at `lr` with `weight_decay`.
`optim.value_optimizer` other than adamw steps the "values" group with a row-sparse rule (train/value_optim.py)
inside the same optimizer object.
"""
from __future__ import annotations

import math
from typing import Collection, Dict, List

import torch

from model import value_parameters

from .adamw import AdamW
from .config import OptimConfig
from .value_optim import RowSparseValueAdamW


def group_name(name: str, param: torch.nn.Parameter, values: Collection[torch.nn.Parameter]) -> str:
    """`values`: the model's value parameters (model.value_parameters)."""
    if param in values:
        return "values"
    if param.ndim < 2 or "norm" in name or name.endswith(".bias"):
        return "no_decay"
    return "decay"


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> List[Dict]:
    members: Dict[str, List[torch.nn.Parameter]] = {"decay": [], "no_decay": [], "values": []}
    values = set(value_parameters(model))
    for name, p in model.named_parameters():  # shared parameters appear once
        if p.requires_grad:
            members[group_name(name, p, values)].append(p)
    settings = {
        "decay": dict(lr=cfg.lr, weight_decay=cfg.weight_decay),
        "no_decay": dict(lr=cfg.lr, weight_decay=cfg.norm_bias_weight_decay),
        "values": dict(lr=cfg.resolved_value_lr, weight_decay=cfg.value_weight_decay),
    }
    return [dict(params=ps, name=g, **settings[g]) for g, ps in members.items() if ps]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, masters=None) -> torch.optim.Optimizer:
    """masters: the MasterWeights of bf16 weights (train/master_weights.py), which the AdamW kernel steps."""
    # foreach=False keeps the CPU path deterministic and simple; fused kernels are a GPU speed-up. Clipping inside
    # the optimizer needs the fused kernel's gradient scale, which CPUs have too.
    fused = cfg.clip_in_optimizer or all(p.is_cuda for p in model.parameters())
    kwargs = dict(betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None, kernel=cfg.adamw_kernel, masters=masters)
    # the value table's row-sparse rule, or fp32 master weights for a bf16 table (train/value_optim.py)
    if cfg.value_optimizer != "adamw" or any(p.dtype != torch.float32 for p in value_parameters(model)):
        return RowSparseValueAdamW(param_groups(model, cfg), cfg.value_optimizer, cfg.value_precision, **kwargs)
    return AdamW(param_groups(model, cfg), **kwargs)


def set_clip_scale(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, max_norm: float) -> None:
    """Clip in the next optimizer.step(): the fused AdamW divides every gradient by its `grad_scale` as it reads
    it (the input torch.amp.GradScaler uses to unscale), here max(1, norm / max_norm): gradients * min(1,
    max_norm / norm), as clip_grad_norm would have multiplied them, without that separate pass."""
    # RowSparseValueAdamW is an AdamW: its value rows divide by the same grad_scale (train/value_optim.py)
    if not (isinstance(optimizer, torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups)):
        raise TypeError(f"optim.clip_in_optimizer: needs torch's fused AdamW, got {type(optimizer).__name__}")
    optimizer.grad_scale = ((grad_norm.float() + 1e-6) / max_norm).clamp(min=1.0) if max_norm > 0 else None


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier on the base rate at optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    def scheduled(step: int) -> float:
        return lr_factor(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)

    lambdas = [
        (scheduled if (g["name"] != "values" or cfg.value_lr_scheduled) else (lambda step: 1.0))
        for g in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
