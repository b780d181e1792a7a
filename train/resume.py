"""Which config keys may change when a run resumes, checked against the config saved in the checkpoint before
anything is loaded or written (README "Outputs and resuming" documents the same rules).

- free: bookkeeping and how the run executes, not what it computes: logging, eval, checkpoint cadence, the
  parallel layout, compile / activation checkpointing, data loading workers, kernel backends, ...
- warned: allowed, but the run no longer equals an uninterrupted one (batch size, precision, grad clipping, the
  validation data): a warning, and the change is recorded in metrics.jsonl.
- train.steps: may change; the learning-rate schedule keeps the horizon of the run's first start (saved in the
  checkpoint as `schedule_steps`), so raising it continues at the schedule's final rate instead of
  re-stretching the cosine; it may not go below the checkpoint's step.
- everything else (model architecture, optimizer settings, training data, tokenizer, seeds) is refused: the
  checkpoint's values would silently win (the optimizer and schedule state are loaded) or the state would not
  fit. Start a new run_dir (with checkpoint.init_from for the weights) to change them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from model.checkpoint import list_checkpoints

from .config import ConfigError, TrainConfig

FREE = (
    "logging.", "eval.", "checkpoint.", "dist.",
    "train.steps", "train.log_every", "train.val_every", "train.val_batches", "train.gc_every", "train.device",
    "train.compile", "train.compile_scope", "train.activation_checkpointing", "train.nonfinite",
    "train.max_skipped_steps",
    "data.num_workers", "data.prefetch", "data.chunk_docs", "data.pin_memory", "data.max_warnings", "data.strict",
    "model.memory.backend", "model.attention_backend", "model.max_seq_len", "model.memory.accumulate_value_grad",
    "model.memory.merge_value_grads", "optim.adamw_kernel", "train.weight_dtype",
)
WARNED = ("train.batch_size", "train.grad_accum", "train.precision", "model.residual_dtype", "optim.grad_clip",
          "optim.clip_in_optimizer", "data.val")


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts -> dotted keys (lists stay whole values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The config as plain JSON values (as saved in checkpoints), so saved and current compare equal."""
    return json.loads(json.dumps(asdict(cfg)))


def compare(saved: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Dotted keys whose values differ -> (saved, current). Keys only one side has are skipped (new options)."""
    a, b = flatten(saved), flatten(current)
    keys = sorted((a.keys() & b.keys()) - {"run_dir"})  # a run directory may be moved or copied
    return {k: (a[k], b[k]) for k in keys if a[k] != b[k]}


def architecture_mismatch(saved_model: Dict[str, Any], model: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Model config keys that change the weights' shapes or meaning (for loading weights into another run)."""
    changed = compare({"model": saved_model}, {"model": model})
    ignored = ("model.memory.backend", "model.attention_backend", "model.max_seq_len", "model.init_std",
               "model.residual_dtype", "model.memory.value_init_std", "model.memory.proj_init",
               "model.memory.value_dtype", "model.memory.accumulate_value_grad",
               "model.memory.merge_value_grads")
    return {k: v for k, v in changed.items() if k not in ignored}


def format_changes(changes: Dict[str, Tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changes.items())


@dataclass
class ResumePlan:
    candidates: List[str]  # complete checkpoints, oldest first (the loader falls back from the newest)
    schedule_steps: int  # the lr schedule's horizon
    changed: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)  # allowed changes vs the saved config
    warnings: List[str] = field(default_factory=list)

    def record(self, step: int, path: str, world_size: int) -> Dict[str, Any]:
        """The metrics.jsonl record of this resume."""
        return {"step": step, "resumed_from": path, "world_size": world_size,
                "changed": {k: {"from": old, "to": new} for k, (old, new) in self.changed.items()}}


def _newest_meta(candidates: List[str]) -> Optional[Dict[str, Any]]:
    from .checkpoint import CheckpointError, read_meta

    for path in reversed(candidates):
        try:
            return read_meta(path)
        except CheckpointError:
            continue  # the loader will report it and fall back
    return None


def plan_resume(cfg: TrainConfig) -> Optional[ResumePlan]:
    """None when there is nothing to resume; else the plan. Raises ConfigError for refused changes."""
    candidates = list_checkpoints(cfg.run_dir) if cfg.checkpoint.resume else []
    if not candidates:
        return None
    meta = _newest_meta(candidates) or {}
    current = config_dict(cfg)
    if "train_config" in meta:
        changed = compare(meta["train_config"], current)
    else:  # checkpoints that saved only the model config
        changed = compare({"model": meta.get("model_config", {})}, {"model": current["model"]})
    refused = {k: v for k, v in changed.items() if not _matches(k, FREE + WARNED)}
    if refused:
        raise ConfigError(
            f"{', '.join(refused)}: differ from the checkpoint this run resumes from ({format_changes(refused)}); "
            f"these cannot change on resume (README: Outputs and resuming): restore them, or start a new "
            f"run_dir (checkpoint.init_from=... starts from this run's weights)")
    step = meta.get("step", 0)
    if cfg.train.steps < step:
        raise ConfigError(f"train.steps: {cfg.train.steps} is below the step of the checkpoint to resume ({step})")
    plan = ResumePlan(candidates, int(meta.get("schedule_steps", cfg.train.steps)), changed)
    for k, (old, new) in changed.items():
        if _matches(k, WARNED):
            plan.warnings.append(f"warning: {k} changed on resume ({old!r} -> {new!r}): the run no longer equals "
                                 f"an uninterrupted one")
    if cfg.train.steps > plan.schedule_steps:
        plan.warnings.append(
            f"warning: train.steps={cfg.train.steps} is past the schedule's horizon ({plan.schedule_steps} steps, "
            f"fixed at the run's first start): steps after it run at the final learning rate")
    return plan


def finished_summary(run_dir: str, step: int) -> Optional[Dict[str, Any]]:
    """The summary a run wrote when it finished at `step` (summary.json, written last), or None.

    Rank 0 reads the file and tells the others, so all ranks take the same path."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return _read_summary(run_dir, step)
    box = [_read_summary(run_dir, step) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _read_summary(run_dir: str, step: int) -> Optional[Dict[str, Any]]:
    from .metrics import SUMMARY_FILE

    try:
        with open(os.path.join(run_dir, SUMMARY_FILE)) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("step") == step and "val_loss" in summary else None
