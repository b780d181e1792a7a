"""Training steps on random tokens, built exactly as `python -m train` builds them (train/builder.py, then
train_step): the one setup behind the step benchmarks, scripts/profile_step.py and scripts/bench_train.py."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, List

import torch

from .builder import build_training
from .config import TrainConfig
from .gc_control import scheduled_gc
from .step import train_step


@dataclass
class StepSetup:
    cfg: TrainConfig
    rt: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    micro_batches: Callable[[], List[torch.Tensor]]

    @property
    def tokens_per_step(self) -> int:
        c = self.cfg
        return c.train.batch_size * c.data.seq_len * c.train.grad_accum

    def step(self):
        return train_step(self.model, self.optimizer, self.scheduler, self.micro_batches(), self.cfg, self.rt)

    def sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()


def build_steps(cfg: TrainConfig, rt, total_steps: int) -> StepSetup:
    """Model, optimizer and scheduler as the trainer builds them, and a source of random micro-batches."""
    state = build_training(cfg, rt, schedule_steps=max(cfg.train.steps, total_steps))
    g = torch.Generator().manual_seed(cfg.train.seed + rt.rank)

    pin = rt.device.type == "cuda"

    def micro_batches():
        # pinned like the trainer's batches: a pageable copy would wait for the previous step's GPU work
        shape = (cfg.train.batch_size, cfg.data.seq_len + 1)
        out = [torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in range(cfg.train.grad_accum)]
        return [b.pin_memory() for b in out] if pin else out

    return StepSetup(cfg, rt, state.model, state.optimizer, state.scheduler, micro_batches)


def time_steps(setup: StepSetup, warmup: int, steps: int) -> float:
    """Seconds per step over `steps` steps after `warmup` untimed ones, with the trainer's scheduled GC."""
    with scheduled_gc(setup.cfg.train.gc_every) as after_step:
        for i in range(warmup):
            setup.step()
            after_step(i + 1)
        # after_step collected the first (compiling) step's garbage; later warmup steps (recompiles) can leave
        # more: collect it before the clock starts, so the timed steps see the steady state.
        gc.collect()
        setup.sync()
        t0 = time.perf_counter()
        for i in range(steps):
            setup.step()
            after_step(warmup + i + 1)
        setup.sync()
        # Read the clock before leaving the context: re-enabling automatic collection there starts a collection
        # (0.5 s after a whole-model compile) that is no step's time.
        elapsed = time.perf_counter() - t0
    return elapsed / max(steps, 1)
