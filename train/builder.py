"""The training stack, built once: model (initialised from the seed), trainable selection, parallelization,
optimizer, learning-rate schedule and data loader, in the order every user of them relies on.

`build_training` is what `python -m train`, the step benchmarks/profiler (train/bench_steps.py) and the
tests build, so they all run the trainer's code. `TrainState` is what a step changes; its `state_dict` is the
checkpoint's meta.json (the model and optimizer tensors go through DCP: train/checkpoint.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from data import all_rank_states, build_loader
from model import Transformer
from model.checkpoint import model_config_to_dict

from .checkpoint import load_newest
from .config import ConfigError, TrainConfig
from .master_weights import apply_master_weights
from .memory_health import track_memory_usage
from .optim import build_optimizer, build_scheduler
from .parallelize import parallelize
from .resume import config_dict
from .runtime import Runtime
from .trainable import apply_trainable, restrict_value_rows


def build_model(cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    # Built on the meta device and initialised in place: the same path at 1 and at 1000 GPUs, and the
    # seed alone decides every initial weight.
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=rt.device)
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    return model


@dataclass
class TrainState:
    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any  # None when the caller feeds its own batches
    schedule_steps: int  # the lr schedule's horizon, fixed at a run's first start (train/resume.py)
    n_params: int
    n_trainable: int
    memory_usage: Dict[int, Any] = field(default_factory=dict)  # memory-health counters (logging.memory_health)
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # over all ranks and starts (the tokens per step may differ between starts)
    skipped_steps: int = 0  # steps whose update the non-finite guard skipped

    def state_dict(self) -> Dict[str, Any]:
        """meta.json of a checkpoint (a collective when distributed: every rank's data position)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "data": all_rank_states(self.loader),  # every rank's position: resumable at another world size
            "model_config": model_config_to_dict(self.cfg.model),
            "train_config": config_dict(self.cfg),  # what a resume is checked against (train/resume.py)
            "schedule_steps": self.schedule_steps,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, meta: Dict[str, Any]) -> None:
        """Continue from meta.json (older checkpoints lack the counters: they start from zero)."""
        self.scheduler.load_state_dict(meta["scheduler"])
        self.loader.load_state_dict(meta["data"])
        self.step = meta["step"]
        self.tokens_seen = meta.get("tokens_seen", 0)
        self.skipped_steps = meta.get("skipped_steps", 0)

    def restore(self, candidates: List[str], warn: Callable[[str], None]) -> str:
        """Load the newest checkpoint of `candidates` that loads (model, optimizer, RNG, this state); its path."""
        path, meta = load_newest(candidates, self.model, self.optimizer, warn=warn)
        self.load_state_dict(meta)
        return path


def build_training(cfg: TrainConfig, rt: Runtime, tokenizer=None, schedule_steps: Optional[int] = None) -> TrainState:
    """Everything a training step needs, built as the trainer builds it. Without `tokenizer`, no data loader
    (callers that feed random tokens); `schedule_steps` defaults to train.steps."""
    model = build_model(cfg, rt)
    n_params = model.num_parameters()
    n_trainable = sum(model.get_parameter(n).numel() for n in apply_trainable(model, cfg.train.trainable))
    if cfg.train.trainable_rows:
        if rt.world_size > 1 or cfg.optim.value_weight_decay:
            raise ConfigError("train.trainable_rows: single process and optim.value_weight_decay=0 only")
        restrict_value_rows(model, cfg.train.trainable_rows)
    usage = track_memory_usage(model) if cfg.logging.memory_health else {}
    model = parallelize(model, cfg, rt)
    masters = apply_master_weights(model, cfg, rt)
    optimizer = build_optimizer(model, cfg.optim, masters)
    schedule_steps = cfg.train.steps if schedule_steps is None else schedule_steps
    scheduler = build_scheduler(optimizer, cfg.optim, schedule_steps)
    loader = None
    if tokenizer is not None:
        loader = build_loader(cfg.data, tokenizer, split="train", rank=rt.dp_rank, world_size=rt.dp_size,
                              batch_size=cfg.train.batch_size)
    return TrainState(cfg, model, optimizer, scheduler, loader, schedule_steps, n_params, n_trainable, usage)
