"""The training loop: build everything from a validated TrainConfig, resume if a checkpoint exists, train,
validate, checkpoint, summarise."""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from data import build_loader, load_tokenizer, unigram_entropy
from model import Transformer
from model.checkpoint import model_config_to_dict

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, to_yaml
from .metrics import MetricsLogger, format_duration, format_progress, truncate_after
from .optim import build_optimizer, build_scheduler
from .parallelize import parallelize
from .runtime import Runtime, setup_runtime


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Mean next-token cross-entropy of a [B, L+1] token batch, computed in fp32."""
    batch = batch.to(rt.device, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with rt.autocast():
        logits = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: List[torch.Tensor], rt: Runtime) -> float:
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=rt.device, dtype=torch.float64)
    for batch in batches:
        total += lm_loss(model, batch, rt).double()
    total = rt.all_reduce_mean(total / max(1, len(batches)))
    model.train(was_training)
    return float(total)


def build_model(cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    # Built on the meta device and initialised in place: the same path at 1 and at 1000 GPUs, and the
    # seed alone decides every initial weight.
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=rt.device)
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    return model


def check_tokenizer(cfg: TrainConfig, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, {cfg.data.tokenizer})"
        )


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train per `cfg`; returns a summary dict (also printed)."""
    rt = setup_runtime(cfg)
    log = None
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_tokenizer(cfg, tokenizer)
        rt.check_layout(cfg)
        os.makedirs(cfg.run_dir, exist_ok=True)
        resume_from = latest_checkpoint(cfg.run_dir) if cfg.checkpoint.resume else None
        if rt.is_main:
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            tok_src = getattr(tokenizer, "path", None)
            if tok_src and os.path.isfile(tok_src):
                shutil.copyfile(tok_src, os.path.join(cfg.run_dir, "tokenizer.model"))
        log = MetricsLogger(cfg.run_dir, cfg.logging, asdict(cfg), enabled=rt.is_main)
        return _train(cfg, rt, tokenizer, log, resume_from)
    finally:
        if log is not None:
            log.close()
        rt.close()


def _train(cfg: TrainConfig, rt: Runtime, tokenizer, log: MetricsLogger, resume_from) -> Dict[str, Any]:
    model = build_model(cfg, rt)
    n_params = model.num_parameters()
    model = parallelize(model, cfg, rt)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    loader = build_loader(
        cfg.data, tokenizer, split="train", rank=rt.dp_rank, world_size=rt.dp_size, batch_size=cfg.train.batch_size
    )

    start_step = 0
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer)
        scheduler.load_state_dict(meta["scheduler"])
        loader.load_state_dict(meta["data"])
        start_step = meta["step"]
        if rt.is_main:
            truncate_after(log.path, start_step)
        log.print(f"resumed from {resume_from} at step {start_step}")
    else:
        log.print(f"mnemo: {n_params / 1e6:.2f}M parameters, {cfg.train.steps} steps, run dir {cfg.run_dir}")

    val_batches = _fixed_val_batches(cfg, tokenizer, rt)
    seq_tokens = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    tokens_per_step = seq_tokens * rt.dp_size
    data_iter = iter(loader)
    model.train()
    step = start_step
    window_t, window_steps = time.perf_counter(), 0
    last_val = None

    def checkpoint_meta() -> Dict[str, Any]:
        return {
            "scheduler": scheduler.state_dict(),
            "data": loader.state_dict(),
            "model_config": model_config_to_dict(cfg.model),
            "tokens_seen": step * tokens_per_step,
        }

    while step < cfg.train.steps:
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(cfg.train.grad_accum):
            batch = next(data_iter)
            with rt.no_sync(model, last=micro == cfg.train.grad_accum - 1):
                loss = lm_loss(model, batch, rt)
                (loss / cfg.train.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = rt.clip_grad_norm(model, cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1

        if step % cfg.train.log_every == 0 or step == cfg.train.steps or step == start_step + 1:
            loss_val = float(rt.all_reduce_mean(loss_sum / cfg.train.grad_accum))
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss is {loss_val} at step {step}; stopping before saving it")
            now = time.perf_counter()
            step_time = (now - window_t) / window_steps
            rec = {
                "step": step,
                "loss": loss_val,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step / step_time,
                "tokens_per_s_per_device": tokens_per_step / step_time / rt.world_size,
                "eta_s": step_time * (cfg.train.steps - step),
                "tokens": step * tokens_per_step,
            }
            log.log(rec)
            log.print(format_progress(rec, cfg.train.steps))
            window_t, window_steps = time.perf_counter(), 0

        if cfg.train.val_every and step % cfg.train.val_every == 0 and step < cfg.train.steps:
            last_val = validation_loss(model, val_batches, rt)
            log.log({"step": step, "val_loss": last_val})
            log.print(f"step {step} | val loss {last_val:.4f}")
            window_t, window_steps = time.perf_counter(), 0

        should_save = step == cfg.train.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        if should_save or rt.stop_requested():
            path = save_checkpoint(cfg.run_dir, step, model, optimizer, checkpoint_meta(), cfg.checkpoint.keep)
            log.print(f"saved checkpoint {path}")
            window_t, window_steps = time.perf_counter(), 0
            if step < cfg.train.steps and rt.stop_requested():
                log.print(f"stop requested: checkpoint saved at step {step}; rerun the same command to resume")
                return {"stopped_at": step}

    final_val = validation_loss(model, val_batches, rt)
    entropy = unigram_entropy(cfg.data, tokenizer, split="val")
    summary = {"step": step, "val_loss": final_val, "unigram_entropy": entropy}
    log.log({"step": step, "val_loss": final_val, "unigram_entropy": entropy})
    log.print(
        f"done: {step} steps | final val loss {final_val:.4f} nats/token | unigram entropy {entropy:.4f} "
        f"(a model that learned only token frequencies) | {100 * (1 - final_val / entropy):.1f}% below it"
    )
    return summary


def _fixed_val_batches(cfg: TrainConfig, tokenizer, rt: Runtime) -> List[torch.Tensor]:
    """The same validation batches at every evaluation, so val losses are comparable across steps."""
    loader = build_loader(
        cfg.data, tokenizer, split="val", rank=rt.dp_rank, world_size=rt.dp_size, batch_size=cfg.train.batch_size
    )
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == cfg.train.val_batches:
            break
    if not batches:
        raise ConfigError(f"data.val: the validation split yields no batch of {cfg.data.seq_len + 1} tokens")
    return batches
