"""Where and how the job runs: device, precision, process group, and the cross-rank helpers the loop needs.

Keeping these here lets the loop read the same at 1 process on a CPU and at N GPUs under torchrun.
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from model.device import autocast, pick_device, pick_dtype

from .config import TrainConfig


@dataclass
class Runtime:
    device: torch.device
    dtype: Optional[torch.dtype]  # autocast dtype, None for full fp32
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0  # rank among data-parallel consumers of distinct batches
    dp_size: int = 1
    mesh: object = None  # DeviceMesh of the dense parameters when distributed
    value_mesh: object = None  # ("mp_replica", "mp") DeviceMesh of the value tables
    memory_comm: object = None  # ops.column_parallel.CollectiveTimer of the memory layers' collectives
    _stop: dict = field(default_factory=lambda: {"flag": False})

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast(self.device, self.dtype)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, last: bool):
        """Skip gradient reduction on all but the last micro-step of an accumulation (FSDP2)."""
        setter = getattr(model, "set_requires_gradient_sync", None)
        if setter is not None:
            setter(last)
        yield

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        from .grad_norm import clip_grad_norm

        return clip_grad_norm(model, max_norm)

    def sync_value_grads(self, model: torch.nn.Module) -> None:
        if self.world_size > 1:
            from model.value_parallel import sync_value_grads

            sync_value_grads(model)

    def request_stop(self, *_):
        self._stop["flag"] = True

    def stop_requested(self, step: int, every: int) -> bool:
        """True on every rank once any rank got SIGTERM/SIGUSR1 (all ranks must save together).

        Distributed, the ranks agree through a collective (a device sync), so they ask only every `every` steps.
        """
        if self.world_size == 1:
            return self._stop["flag"]
        if step % every:
            return False
        flag = torch.tensor(1.0 if self._stop["flag"] else 0.0, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def check_layout(self, cfg: TrainConfig) -> None:
        from .distributed import check_layout

        check_layout(cfg, self.world_size)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(cfg: TrainConfig) -> Runtime:
    device = pick_device(cfg.train.device, key="train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    rt = Runtime(device=device, dtype=pick_dtype(cfg.train.precision, device))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import init_distributed

        init_distributed(rt, cfg)
    # SIGUSR1 is what SLURM sends before the time limit (see launch/slurm.py); SIGTERM on preemption.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            signal.signal(sig, rt.request_stop)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            pass
    return rt
