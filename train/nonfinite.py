"""Guard against non-finite training: a NaN/inf loss or gradient norm is caught on the step it happens, and a
non-finite state is never checkpointed.

Policy (`train.nonfinite`):
- stop (default): every step adds "was this step finite?" to a counter that stays on the device, so the check
  costs no host synchronisation per step; the counter is read where the loop synchronises anyway (logged steps)
  and always before a checkpoint is written. A bad step stops the run with NonFiniteError before anything is
  saved, so the checkpoints on disk are the last good ones.
- skip: the optimizer step of a bad step is skipped (the batch is dropped, the schedule advances). Deciding
  whether to step needs the flag on the host, so skip mode reads it every step (one device sync per step: the
  host can no longer queue the next step's kernels while the device still runs this one). Skipped steps are
  counted (`skipped_steps` in metrics.jsonl and in checkpoints) and the run stops once more than
  `train.max_skipped_steps` were skipped.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .distributed import local_tensor


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient norm or parameter; nothing was saved after it."""


def _finite(*values: torch.Tensor) -> torch.Tensor:
    ok = torch.ones((), dtype=torch.bool, device=values[0].device)
    for v in values:
        ok = ok & torch.isfinite(v.detach().to(ok.device)).all()
    return ok


@torch.no_grad()
def parameters_finite(module: torch.nn.Module) -> bool:
    """True when every parameter of `module` is finite on every rank (one collective when distributed)."""
    local = [local_tensor(p) for p in module.parameters()]
    local = [t for t in local if t.numel()]
    bad = torch.zeros((), dtype=torch.float32, device=local[0].device if local else "cpu")
    if local:
        # a NaN or inf anywhere makes the sum non-finite; one reduction instead of one check per tensor
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(local, 2.0, dtype=torch.float32)).sum())).float()
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class NonFiniteGuard:
    def __init__(self, policy: str, max_skipped: int, device: torch.device, skipped: int = 0, warn=print):
        if policy not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite: must be stop or skip, got {policy!r}")
        self.policy = policy
        self.max_skipped = max_skipped
        self.skipped = skipped  # skip mode: total over the run (restored from the checkpoint)
        self.warn = warn
        self._bad_steps = torch.zeros((), dtype=torch.int64, device=device)  # stop mode, on the device
        self._first_bad = torch.zeros((), dtype=torch.int64, device=device)

    def step_ok(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Record optimizer step `step` (1-based); return whether its update should be applied.

        `loss` and `grad_norm` must be the same on every rank (globally reduced), so all ranks decide alike.
        """
        ok = _finite(loss, grad_norm)
        if self.policy == "skip":
            if bool(ok):
                return True
            self.skipped += 1
            self.check(f"at step {step}")
            self.warn(f"warning: step {step}: non-finite loss or gradient norm, update skipped "
                      f"({self.skipped} skipped, train.max_skipped_steps={self.max_skipped})")
            return False
        bad = (~ok).to(torch.int64)
        self._first_bad = torch.where((self._bad_steps == 0) & (bad > 0), step, self._first_bad)
        self._bad_steps += bad
        return True

    def check(self, where: str, newest_checkpoint: Optional[str] = None) -> None:
        """Raise NonFiniteError when the run must stop; `where` says what was about to happen."""
        keep = f"; the newest checkpoint ({newest_checkpoint}) is from before it" if newest_checkpoint else ""
        if self.policy == "skip":
            if self.skipped > self.max_skipped:
                raise NonFiniteError(
                    f"{self.skipped} steps had a non-finite loss or gradient norm and were skipped, more than "
                    f"train.max_skipped_steps={self.max_skipped}; stopping {where}{keep}")
            return
        n = int(self._bad_steps.item())
        if n:
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {int(self._first_bad.item())} ({n} bad steps so far); "
                f"stopping {where} (train.nonfinite=stop; train.nonfinite=skip drops such steps instead){keep}")

    def check_before_save(self, model: torch.nn.Module, step: int, newest_checkpoint: Optional[str]) -> None:
        self.check(f"before saving step {step}", newest_checkpoint)
        if not parameters_finite(model):
            keep = f"; the newest checkpoint ({newest_checkpoint}) is from before it" if newest_checkpoint else ""
            raise NonFiniteError(f"non-finite parameters at step {step}; not saving them{keep}")
