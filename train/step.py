"""One optimizer step: forward and backward over the micro-batches of a gradient accumulation, gradient sync and
clipping, the update and the schedule."""
from __future__ import annotations

import torch

from .config import TrainConfig
from .optim import set_clip_scale
from .runtime import Runtime


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Mean next-token cross-entropy of a [B, L+1] token batch, computed in fp32 (inside the model's forward,
    chunk by chunk with the output projection: the full logits are never materialised)."""
    batch = batch.to(rt.device, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with rt.autocast():
        return model(inputs, targets=targets)


def train_step(model, optimizer, scheduler, micro_batches, cfg: TrainConfig, rt: Runtime, step_ok=None):
    """One optimizer step over `micro_batches` (gradient accumulation).

    Returns (mean loss, (grad norm, {part: grad norm})) with parts "dense" and "values".
    `step_ok(loss, grad_norm)` decides whether the update is applied (the non-finite guard)."""
    loss_sum = torch.zeros((), device=rt.device)
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        with rt.no_sync(model, last=i == n - 1):
            loss = lm_loss(model, batch, rt)
            (loss / n).backward()
        loss_sum += loss.detach()
    rt.sync_value_grads(model)
    in_optimizer = cfg.optim.clip_in_optimizer
    grad_norm, grad_parts = rt.clip_grad_norm(model, 0.0 if in_optimizer else cfg.optim.grad_clip)  # 0: norm only
    if in_optimizer:
        set_clip_scale(optimizer, grad_norm, cfg.optim.grad_clip)
    loss = rt.all_reduce_mean(loss_sum / n)
    if step_ok is None or step_ok(loss, grad_norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, (grad_norm, grad_parts)
