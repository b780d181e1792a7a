"""The training loop: build everything from a validated TrainConfig, resume if a checkpoint exists, train,
validate, checkpoint, summarise."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from typing import Any, Dict, List

import torch

from data import all_rank_states, build_loader, check_vocab, load_tokenizer, skipped_totals, unigram_entropy
from eval import fixed_val_batches, flatten, format_table, load_eval_tasks, run_tasks, validation_metrics
from model import Transformer
from model.checkpoint import model_config_to_dict
from model.flops import flops_per_token

from .checkpoint import Checkpointer, latest_checkpoint, load_newest
from .config import ConfigError, TrainConfig, to_yaml
from .gc_control import scheduled_gc
from .metrics import MetricsLogger, format_duration, format_progress, format_summary, truncate_after, write_summary
from .mfu import device_peak_flops, mfu
from .nonfinite import NonFiniteGuard
from .optim import build_optimizer, build_scheduler
from .parallelize import eager_for_eval, parallelize
from .memory_health import memory_health_metrics, track_memory_usage
from .resume import config_dict, finished_summary, format_changes, plan_resume
from .trainable import apply_trainable, restrict_value_rows
from .weights import init_weights_from
from .runtime import Runtime, setup_runtime


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Mean next-token cross-entropy of a [B, L+1] token batch, computed in fp32 (inside the model's forward,
    chunk by chunk with the output projection: the full logits are never materialised)."""
    batch = batch.to(rt.device, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with rt.autocast():
        return model(inputs, targets=targets)


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
    try:
        check_vocab(tokenizer, cfg.model.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len ({cfg.model.max_seq_len})")


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
    grad_norm, grad_parts = rt.clip_grad_norm(model, cfg.optim.grad_clip)
    loss = rt.all_reduce_mean(loss_sum / n)
    if step_ok is None or step_ok(loss, grad_norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, (grad_norm, grad_parts)


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train per `cfg`; returns a summary dict (also printed)."""
    rt = setup_runtime(cfg)
    log = checkpointer = None
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_tokenizer(cfg, tokenizer)
        rt.check_layout(cfg)
        os.makedirs(cfg.run_dir, exist_ok=True)
        resume = plan_resume(cfg)  # refuses config changes a resume cannot honour, before anything is written
        if rt.is_main:
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            tok_src = getattr(tokenizer, "path", None)
            tok_copy = os.path.join(cfg.run_dir, "tokenizer.model")
            if tok_src and os.path.isfile(tok_src):
                shutil.copyfile(tok_src, tok_copy)
            elif os.path.isfile(tok_copy):  # an earlier run's (this one has no file): eval would take it for ours
                os.remove(tok_copy)
        log = MetricsLogger(cfg.run_dir, cfg.logging, asdict(cfg), enabled=rt.is_main)
        checkpointer = Checkpointer(cfg.run_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every, cfg.checkpoint.async_save)
        with scheduled_gc(cfg.train.gc_every) as after_step:
            summary = _train(cfg, rt, tokenizer, log, resume, checkpointer, after_step)
        checkpointer.wait()
        return summary
    except BaseException:
        if checkpointer is not None:
            # an in-flight save holds a state checked before it was taken: publish it when no other rank is
            # needed for that; distributed, the other ranks may be gone, so only let the write end
            checkpointer.wait() if rt.world_size == 1 else checkpointer.abandon()
        raise
    finally:
        if log is not None:
            log.close()
        rt.close()


def _train(cfg: TrainConfig, rt: Runtime, tokenizer, log: MetricsLogger, resume, checkpointer: Checkpointer,
           after_step) -> Dict[str, Any]:
    model = build_model(cfg, rt)
    n_params = model.num_parameters()
    step_flops = flops_per_token(cfg.model, cfg.data.seq_len).total  # training FLOPs per token
    peak_flops = device_peak_flops(rt.device, cfg.train.peak_flops)
    n_trainable = sum(model.get_parameter(n).numel() for n in apply_trainable(model, cfg.train.trainable))
    if cfg.train.trainable_rows:
        if rt.world_size > 1 or cfg.optim.value_weight_decay:
            raise ConfigError("train.trainable_rows: single process and optim.value_weight_decay=0 only")
        restrict_value_rows(model, cfg.train.trainable_rows)
    usage = track_memory_usage(model) if cfg.logging.memory_health else {}
    model = parallelize(model, cfg, rt)
    optimizer = build_optimizer(model, cfg.optim)
    # the schedule's horizon is fixed at a run's first start (train/resume.py)
    schedule_steps = resume.schedule_steps if resume is not None else cfg.train.steps
    scheduler = build_scheduler(optimizer, cfg.optim, schedule_steps)
    loader = build_loader(
        cfg.data, tokenizer, split="train", rank=rt.dp_rank, world_size=rt.dp_size, batch_size=cfg.train.batch_size
    )

    start_step, tokens_before, skipped = 0, 0, 0
    if resume is not None:
        resume_from, meta = load_newest(resume.candidates, model, optimizer, warn=log.print)
        scheduler.load_state_dict(meta["scheduler"])
        loader.load_state_dict(meta["data"])
        start_step = meta["step"]
        tokens_before = meta.get("tokens_seen", 0)
        skipped = meta.get("skipped_steps", 0)
        if rt.is_main:
            truncate_after(log.path, start_step)
        if start_step >= cfg.train.steps:
            done = finished_summary(cfg.run_dir, start_step)
            if done is not None:
                log.print(f"run already finished at step {start_step} ({resume_from}): final val loss "
                          f"{done['val_loss']:.4f}; raise train.steps to train further")
                return done
        for line in resume.warnings:
            log.print(line)
        log.log(resume.record(start_step, resume_from, rt.world_size))
        log.print(f"resumed from {resume_from} at step {start_step}"
                  + (f"; changed: {format_changes(resume.changed)}" if resume.changed else ""))
    else:
        if cfg.checkpoint.init_from:
            init_weights_from(cfg, model, log)
        trained = "" if n_trainable == n_params else f" ({n_trainable / 1e6:.2f}M trainable: {cfg.train.trainable})"
        log.print(f"mnemo: {n_params / 1e6:.2f}M parameters{trained}, {cfg.train.steps} steps, run dir {cfg.run_dir}")
        log.log({"step": 0, "params": n_params, "flops_per_token": step_flops})
    guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_skipped_steps, rt.device, skipped, warn=log.print)

    val_batches = fixed_val_batches(
        cfg.data, tokenizer, cfg.train.val_batches, cfg.train.batch_size, rank=rt.dp_rank, world_size=rt.dp_size
    )
    if not any(val_batches.values()):
        raise ConfigError(f"data.val: the validation split yields no batch of {cfg.data.seq_len + 1} tokens")
    eval_tasks = load_eval_tasks(cfg.eval) if cfg.eval.tasks else []

    def evaluate(step: int, final: bool = False, qa: bool = False) -> float:
        """Validation NLL every time; QA tasks every eval.every steps and at the end. Returns val loss."""
        metrics = validation_metrics(model, val_batches, tokenizer, amp_dtype=rt.dtype)
        record = {"step": step, **metrics}
        if eval_tasks and (final or qa):
            t_eval = time.perf_counter()
            with eager_for_eval(cfg):  # generation's cache positions and layer indices would recompile blocks
                results = run_tasks(model, tokenizer, cfg.eval, step=step, tasks=eval_tasks, amp_dtype=rt.dtype,
                                    out_path=os.path.join(cfg.run_dir, "eval.jsonl"))
            record.update(flatten(results))
            record["eval/seconds"] = time.perf_counter() - t_eval
            log.print(format_table(results))
        log.log(record)
        log.print(f"step {step} | val loss {metrics['val/loss']:.4f} | val bpb {metrics.get('val/bpb', float('nan')):.4f}")
        return metrics["val/loss"]
    seq_tokens = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    tokens_per_step = seq_tokens * rt.dp_size
    data_iter = iter(loader)
    model.train()
    step = start_step
    window_t, window_steps = time.perf_counter(), 0

    data_wait = {"s": 0.0}  # host time spent waiting for batches in the current window

    def restart_window():
        """Throughput, data wait and collective time are measured over training steps only (not eval or saving)."""
        if rt.memory_comm is not None:
            rt.memory_comm.read_ms()
        data_wait["s"] = 0.0
        return time.perf_counter(), 0

    def tokens_seen() -> int:  # the tokens per step may differ from the previous start's (world size)
        return tokens_before + (step - start_step) * tokens_per_step

    def checkpoint_meta() -> Dict[str, Any]:
        return {
            "scheduler": scheduler.state_dict(),
            "data": all_rank_states(loader),  # every rank's position: resumable at another world size
            "model_config": model_config_to_dict(cfg.model),
            "train_config": config_dict(cfg),  # what a resume is checked against (train/resume.py)
            "schedule_steps": schedule_steps,
            "tokens_seen": tokens_seen(),
            "skipped_steps": guard.skipped,
        }

    while step < cfg.train.steps:
        t_data = time.perf_counter()
        micro_batches = [next(data_iter) for _ in range(cfg.train.grad_accum)]
        data_wait["s"] += time.perf_counter() - t_data
        loss, (grad_norm, grad_parts) = train_step(model, optimizer, scheduler, micro_batches, cfg, rt,
                                                   step_ok=lambda l, g: guard.step_ok(step + 1, l, g))
        step += 1
        window_steps += 1
        after_step(step)

        if step % cfg.train.log_every == 0 or step == cfg.train.steps or step == start_step + 1:
            guard.check(f"at step {step}", latest_checkpoint(cfg.run_dir))
            loss_val = float(loss)
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
                "tokens": tokens_seen(),
                "data_wait_ms": data_wait["s"] * 1e3 / window_steps,  # per step: the loop waiting for batches
                "data_wait_frac": data_wait["s"] / (now - window_t),
            }
            rec.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
            rec.update({f"grad_norm/{part}": float(v) for part, v in grad_parts.items()})
            if peak_flops:
                rec["mfu"] = mfu(rec["tokens_per_s_per_device"], step_flops, peak_flops)
            if rt.device.type == "cuda":
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
            if guard.policy == "skip":
                rec["skipped_steps"] = guard.skipped
            if rt.memory_comm is not None:
                # memory-layer collectives (lookups forward and backward, value-gradient sum), per step
                comm_s = rt.memory_comm.read_ms() / 1e3 / window_steps
                rec["memory_comm_ms"] = comm_s * 1e3
                rec["memory_comm_frac"] = comm_s / step_time
            rec.update(memory_health_metrics(usage))
            log.log(rec)
            log.print(format_progress(rec, cfg.train.steps))
            window_t, window_steps = restart_window()
            published = checkpointer.poll()
            if published:
                log.print(f"saved checkpoint {published}")

        due_val = cfg.train.val_every and step % cfg.train.val_every == 0
        due_qa = bool(eval_tasks) and cfg.eval.every and step % cfg.eval.every == 0
        if (due_val or due_qa) and step < cfg.train.steps:
            evaluate(step, qa=due_qa)
            window_t, window_steps = restart_window()

        should_save = (step == cfg.train.steps and cfg.checkpoint.save_final) or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        stop = rt.stop_requested(step, cfg.train.log_every)
        if should_save or stop:
            published = checkpointer.wait()  # the previous asynchronous save, if one is in flight
            if published:
                log.print(f"saved checkpoint {published}")
            guard.check_before_save(model, step, latest_checkpoint(cfg.run_dir))
            path = checkpointer.save(step, model, optimizer, checkpoint_meta())
            if not checkpointer.in_flight:
                log.print(f"saved checkpoint {path}")
            window_t, window_steps = restart_window()
            if step < cfg.train.steps and stop:
                published = checkpointer.wait()
                if published:
                    log.print(f"saved checkpoint {published}")
                log.print(f"stop requested: checkpoint saved at step {step}; rerun the same command to resume")
                return {"stopped_at": step}

    published = checkpointer.wait()
    if published:
        log.print(f"saved checkpoint {published}")
    final_val = evaluate(step, final=True)
    entropy = unigram_entropy(cfg.data, tokenizer, split="val")
    bad_records = skipped_totals(all_rank_states(loader))
    summary = {"step": step, "val_loss": final_val, "unigram_entropy": entropy, "skipped_records": bad_records["skipped"],
               "tokens": tokens_seen(), "params": n_params, "flops_per_token": step_flops}
    log.log({"step": step, "unigram_entropy": entropy, **{f"data/{k}": v for k, v in bad_records.items()}})
    if rt.is_main:
        write_summary(cfg.run_dir, summary)
    log.print(format_summary(step, final_val, entropy, bad_records))
    return summary
