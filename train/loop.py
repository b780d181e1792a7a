"""The training loop: build everything from a validated TrainConfig, resume if a checkpoint exists, then per
step: the step, and the hooks that are due (log, validation and evaluation, checkpoint, stop); summarise."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from typing import Any, Dict

import torch

from data import all_rank_states, check_vocab, load_tokenizer, skipped_totals, unigram_entropy
from eval import fixed_val_batches, flatten, format_table, load_eval_tasks, run_tasks, validation_metrics
from model import prepare_attention, prepare_memory_kernels
from model.flops import flops_per_token

from .builder import TrainState, build_training
from .checkpoint import Checkpointer, latest_checkpoint
from .config import ConfigError, TrainConfig, to_yaml
from .gc_control import scheduled_gc
from .metrics import MetricsLogger, format_progress, format_summary, truncate_after, write_summary
from .mfu import device_peak_flops, mfu
from .nonfinite import NonFiniteGuard
from .parallelize import eager_for_eval
from .memory_health import memory_health_metrics
from .resume import ResumePlan, finished_summary, format_changes, plan_resume
from .runtime import Runtime, setup_runtime
from .step import train_step
from .weights import init_weights_from
from .window import StepWindow


def every(step: int, n: int) -> bool:
    """Whether a hook with period `n` is due at `step` (n = 0: never)."""
    return n > 0 and step % n == 0


def check_tokenizer(cfg: TrainConfig, tokenizer) -> None:
    try:
        check_vocab(tokenizer, cfg.model.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len ({cfg.model.max_seq_len})")


def check_attention(cfg: TrainConfig, rt: Runtime):
    """The attention backend against this run's device and precision (model.prepare_attention): a log line or
    None; a backend that cannot run here is a config error."""
    try:
        return prepare_attention(cfg.model, rt.device, rt.dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train per `cfg`; returns a summary dict (also printed)."""
    rt = setup_runtime(cfg)
    log = checkpointer = None
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_tokenizer(cfg, tokenizer)
        rt.check_layout(cfg)
        attention_note = check_attention(cfg, rt)
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
        if attention_note:
            log.print(attention_note)
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
    state = build_training(cfg, rt, tokenizer, resume.schedule_steps if resume is not None else cfg.train.steps)
    note = prepare_memory_kernels(cfg.model, rt.device, rt.dtype)
    if note:
        log.print(note)
    if resume is None:
        start_fresh(cfg, state, log)
    else:
        done = resume_run(cfg, rt, state, resume, log)
        if done is not None:
            return done
    return Trainer(cfg, rt, state, tokenizer, log, checkpointer, after_step).train()


def start_fresh(cfg: TrainConfig, state: TrainState, log: MetricsLogger) -> None:
    if cfg.checkpoint.init_from:
        init_weights_from(cfg, state.model, log)
    n_params, n_trainable = state.n_params, state.n_trainable
    trained = "" if n_trainable == n_params else f" ({n_trainable / 1e6:.2f}M trainable: {cfg.train.trainable})"
    log.print(f"mnemo: {n_params / 1e6:.2f}M parameters{trained}, {cfg.train.steps} steps, run dir {cfg.run_dir}")
    log.log({"step": 0, "params": n_params, "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len).total})


def resume_run(cfg: TrainConfig, rt: Runtime, state: TrainState, resume: ResumePlan, log: MetricsLogger):
    """Load the newest usable checkpoint into `state`. Returns the run's summary when it had already finished."""
    resume_from = state.restore(resume.candidates, warn=log.print)
    if rt.is_main:
        truncate_after(log.path, state.step)
    if state.step >= cfg.train.steps:
        done = finished_summary(cfg.run_dir, state.step)
        if done is not None:
            log.print(f"run already finished at step {state.step} ({resume_from}): final val loss "
                      f"{done['val_loss']:.4f}; raise train.steps to train further")
            return done
    for line in resume.warnings:
        log.print(line)
    log.log(resume.record(state.step, resume_from, rt.world_size))
    log.print(f"resumed from {resume_from} at step {state.step}"
              + (f"; changed: {format_changes(resume.changed)}" if resume.changed else ""))
    return None


class Trainer:
    """Trains `state` to train.steps: each step, then the hooks due after it."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, state: TrainState, tokenizer, log: MetricsLogger,
                 checkpointer: Checkpointer, after_step):
        self.cfg, self.rt, self.state, self.tokenizer, self.log = cfg, rt, state, tokenizer, log
        self.checkpointer, self.after_step = checkpointer, after_step
        self.start_step = state.step
        self.guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_skipped_steps, rt.device, state.skipped_steps,
                                    warn=log.print)
        self.val_batches = fixed_val_batches(cfg.data, tokenizer, cfg.train.val_batches, cfg.train.batch_size,
                                             rank=rt.dp_rank, world_size=rt.dp_size)
        if not any(self.val_batches.values()):
            raise ConfigError(f"data.val: the validation split yields no batch of {cfg.data.seq_len + 1} tokens")
        self.eval_tasks = load_eval_tasks(cfg.eval) if cfg.eval.tasks else []
        self.step_flops = flops_per_token(cfg.model, cfg.data.seq_len).total  # training FLOPs per token
        self.peak_flops = device_peak_flops(rt.device, cfg.train.peak_flops)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum * rt.dp_size
        self.batches = iter(state.loader)
        self.window = StepWindow(rt.memory_comm)
        # Evaluation's share of this process's training time (validation and QA): what frequent evaluation costs.
        self.t_start = time.perf_counter()
        self.eval_seconds = 0.0

    def train(self) -> Dict[str, Any]:
        cfg, state = self.cfg, self.state
        state.model.train()
        while state.step < cfg.train.steps:
            loss, grad_norms = self.step()
            step = state.step
            if every(step, cfg.train.log_every) or step == cfg.train.steps or step == self.start_step + 1:
                self.log_step(loss, grad_norms)
            due_qa = bool(self.eval_tasks) and every(step, cfg.eval.every)
            if (every(step, cfg.train.val_every) or due_qa) and step < cfg.train.steps:
                self.evaluate(qa=due_qa)
                self.window.restart()
            stop = self.rt.stop_requested(step, cfg.train.log_every)
            if every(step, cfg.checkpoint.every) or (step == cfg.train.steps and cfg.checkpoint.save_final) or stop:
                self.save()
            if stop and step < cfg.train.steps:
                self.announce(self.checkpointer.wait())
                self.log.print(f"stop requested: checkpoint saved at step {step}; rerun the same command to resume")
                return {"stopped_at": step}
        return self.finish()

    def step(self):
        state, cfg = self.state, self.cfg
        micro_batches = self.window.next_batches(self.batches, cfg.train.grad_accum)
        step_ok = lambda loss, grad_norm: self.guard.step_ok(state.step + 1, loss, grad_norm)  # noqa: E731
        out = train_step(state.model, state.optimizer, state.scheduler, micro_batches, cfg, self.rt, step_ok)
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        state.skipped_steps = self.guard.skipped
        self.window.step_done()
        self.after_step(state.step)
        return out

    def announce(self, published) -> None:
        if published:
            self.log.print(f"saved checkpoint {published}")

    def log_step(self, loss: torch.Tensor, grad_norms) -> None:
        cfg, rt, state, step = self.cfg, self.rt, self.state, self.state.step
        self.guard.check(f"at step {step}", latest_checkpoint(cfg.run_dir))
        grad_norm, grad_parts = grad_norms
        rec = {"step": step, "loss": float(loss), "lr": state.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm), "tokens": state.tokens_seen,
               **self.window.rates(self.tokens_per_step, rt.world_size, cfg.train.steps - step)}
        rec.update({f"lr/{g['name']}": g["lr"] for g in state.optimizer.param_groups})
        rec.update({f"grad_norm/{part}": float(v) for part, v in grad_parts.items()})
        if self.peak_flops:
            rec["mfu"] = mfu(rec["tokens_per_s_per_device"], self.step_flops, self.peak_flops)
        if rt.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
        if self.guard.policy == "skip":
            rec["skipped_steps"] = self.guard.skipped
        rec.update(memory_health_metrics(state.memory_usage))
        self.log.log(rec)
        self.log.print(format_progress(rec, cfg.train.steps))
        self.window.restart()
        self.announce(self.checkpointer.poll())

    def evaluate(self, final: bool = False, qa: bool = False) -> float:
        """Validation NLL every time; QA tasks every eval.every steps and at the end. Returns val loss."""
        cfg, rt, model, step = self.cfg, self.rt, self.state.model, self.state.step
        t_eval = time.perf_counter()
        metrics = validation_metrics(model, self.val_batches, self.tokenizer, amp_dtype=rt.dtype)
        record = {"step": step, **metrics}
        if self.eval_tasks and (final or qa):
            with eager_for_eval(cfg):  # generation's cache positions and layer indices would recompile blocks
                results = run_tasks(model, self.tokenizer, cfg.eval, step=step, tasks=self.eval_tasks,
                                    amp_dtype=rt.dtype, out_path=os.path.join(cfg.run_dir, "eval.jsonl"))
            record.update(flatten(results))
            self.log.print(format_table(results))
        now = time.perf_counter()
        self.eval_seconds += now - t_eval
        record["eval/seconds"] = now - t_eval
        record["eval/share"] = self.eval_share(now)
        self.log.log(record)
        self.log.print(f"step {step} | val loss {metrics['val/loss']:.4f} | "
                       f"val bpb {metrics.get('val/bpb', float('nan')):.4f}")
        return metrics["val/loss"]

    def eval_share(self, now: float) -> float:
        """Fraction of this process's wall time since training (re)started spent in evaluation."""
        return self.eval_seconds / max(now - self.t_start, 1e-9)

    def save(self) -> None:
        state = self.state
        self.announce(self.checkpointer.wait())  # the previous asynchronous save, if one is in flight
        self.guard.check_before_save(state.model, state.step, latest_checkpoint(self.cfg.run_dir))
        path = self.checkpointer.save(state.step, state.model, state.optimizer, state.state_dict())
        if not self.checkpointer.in_flight:
            self.log.print(f"saved checkpoint {path}")
        self.window.restart()

    def finish(self) -> Dict[str, Any]:
        cfg, state, step = self.cfg, self.state, self.state.step
        self.announce(self.checkpointer.wait())
        final_val = self.evaluate(final=True)
        entropy = unigram_entropy(cfg.data, self.tokenizer, split="val")
        bad_records = skipped_totals(all_rank_states(state.loader))
        summary = {"step": step, "val_loss": final_val, "unigram_entropy": entropy,
                   "skipped_records": bad_records["skipped"], "tokens": state.tokens_seen, "params": state.n_params,
                   "flops_per_token": self.step_flops, "eval_seconds": self.eval_seconds,
                   "eval_share": self.eval_share(time.perf_counter())}
        self.log.log({"step": step, "unigram_entropy": entropy, **{f"data/{k}": v for k, v in bad_records.items()}})
        if self.rt.is_main:
            write_summary(cfg.run_dir, summary)
        self.log.print(format_summary(step, final_val, entropy, bad_records, summary["eval_share"]))
        return summary
