"""The training job's configuration: one dataclass per component, composed into `TrainConfig`.

Configs come from a YAML preset merged with `key.sub=value` overrides (OmegaConf structured configs), so an
unknown key or a value of the wrong type is rejected by name before any compute starts; `validate()` then
checks the relations between values (layer indices, divisibility, ...).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from omegaconf import OmegaConf

from data import DataConfig
from data.config import REPO_ROOT
from eval import EvalConfig
from model import ModelConfig
from model.cli_config import ConfigError, Device, Precision, WandbMode, check_choices, load_structured

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_cli", "to_yaml", "DEFAULT_PRESET"]

# Choices are Literal types: OmegaConf rejects other values by key, check_choices covers configs built in code.
Trainable = Literal["all", "memory", "values", "ffn"]  # the keys of train.trainable.SELECTORS
NonFinite = Literal["stop", "skip"]
ReduceDtype = Literal["fp32", "bf16", "param"]
DistBackend = Literal["auto", "nccl", "gloo"]
ValueOptimizer = Literal["adamw", "sparse_adam", "rowwise_adagrad"]  # row rules: train/value_optim.py
ValuePrecision = Literal["fp32_master", "bf16_stochastic"]  # a bf16 value table's update: train/value_optim.py
AdamWKernel = Literal["auto", "torch", "triton"]  # the update kernel of the AdamW groups: train/adamw.py
WeightDtype = Literal["auto", "fp32", "bf16"]  # the blocks' linear weights: train/master_weights.py
CompileScope = Literal["blocks", "model"]  # what train.compile compiles: train/parallelize.py

# What `python -m train` trains without config= (the same as `make train`).
DEFAULT_PRESET = "configs/tiny.yaml"


@dataclass
class OptimConfig:
    lr: float = 3e-3
    # The value table is updated sparsely (a row only when it is read), so it wants its own, higher rate (paper:
    # 1e-3 vs 1e-4). value_lr: an absolute rate; null -> value_lr_mult * lr (RESULTS.md: the facts experiment).
    value_lr: Optional[float] = None
    value_lr_mult: float = 10.0
    # Whether the value rate follows warmup/cosine like the rest, or stays fixed at value_lr.
    value_lr_scheduled: bool = True
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Decay on norm weights, biases and values is off by default; each is configurable.
    norm_bias_weight_decay: float = 0.0
    value_weight_decay: float = 0.0
    # The value table's update rule (train/value_optim.py): adamw (the paper's: dense AdamW like the rest),
    # sparse_adam (lazy Adam: only rows read this step move) or rowwise_adagrad (one accumulator per row:
    # N floats of state instead of 2 * N * v_dim). The other parameters always use AdamW.
    value_optimizer: ValueOptimizer = "adamw"
    # How a bf16 value table (model.memory.value_dtype=bfloat16) is updated: fp32_master (an fp32 copy and fp32
    # moments in the optimizer, the table the master rounded: 12 bytes of state per element) or bf16_stochastic
    # (no master, bf16 moments, the table and moments rounded stochastically: 4 bytes per element, a shorter pass).
    value_precision: ValuePrecision = "fp32_master"
    warmup_steps: int = 100
    # Cosine decays to lr * min_lr_ratio at the last step.
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Clip inside the optimizer's update: the fused AdamW (and the value rules of train/value_optim.py) divide
    # each gradient by the clip factor as they read it (the grad_scale input), instead of a separate pass
    # multiplying every gradient. The same update up to rounding. Uses the fused AdamW on any device.
    clip_in_optimizer: bool = False
    # The AdamW update's kernel: auto (mnemo's multi-tensor Triton kernel for fp32 parameters on a GPU, the same
    # update as torch's fused AdamW at a higher bandwidth; torch's AdamW elsewhere), torch (always torch's) or triton
    # (the kernel on any device: on a CPU under the Triton interpreter, TRITON_INTERPRET=1, slow: for tests). The
    # optimizer state and checkpoints are torch's either way.
    adamw_kernel: AdamWKernel = "auto"

    @property
    def resolved_value_lr(self) -> float:
        return self.value_lr if self.value_lr is not None else self.value_lr_mult * self.lr

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        for key in ("lr", "eps", "value_lr_mult"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{prefix}.{key}: must be > 0, got {getattr(self, key)}")
        if self.value_lr is not None and self.value_lr <= 0:
            raise ValueError(f"{prefix}.value_lr: must be > 0 (or null for value_lr_mult * lr), got {self.value_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{prefix}.betas: need two values in [0, 1), got {list(self.betas)}")
        for key in ("weight_decay", "norm_bias_weight_decay", "value_weight_decay", "warmup_steps", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{prefix}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LoopConfig:
    steps: int = 1000
    batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    # The blocks' linear weights (train/master_weights.py): fp32 (autocast casts them at every use and their
    # gradients back), or bf16 with fp32 masters beside them that the optimizer steps: the same step without those
    # casts. Checkpoints hold the fp32 masters either way. bf16 takes bf16 autocast, one process, grad_accum 1 and
    # the Triton AdamW kernel; auto: bf16 where the run has all of them on a GPU, else fp32.
    weight_dtype: WeightDtype = "auto"
    compile: bool = False
    # With compile: "blocks" compiles each block on its own (fast to compile; embedding, final norm and loss run
    # eagerly); "model" compiles the whole forward as one program (one process only), so that the elementwise
    # work between blocks and around the embedding and final norm is fused too; the loss stays eager.
    compile_scope: CompileScope = "blocks"
    activation_checkpointing: bool = False
    log_every: int = 10
    val_every: int = 100  # 0 disables periodic validation (a final one still runs)
    val_batches: int = 8
    # Python's garbage collector runs every this many steps, on all ranks at once, instead of whenever its
    # allocation counters say (0: leave it automatic). An automatic collection pauses one rank at a random moment
    # and every other rank waits for it at the next collective.
    gc_every: int = 50
    # Peak FLOP/s of one device for the logged MFU; null: looked up from the GPU's name (none on CPU).
    peak_flops: Optional[float] = None
    # Parameters trained: all | memory | values | ffn (train/trainable.py); the others are frozen.
    trainable: Trainable = "all"
    # A JSON list of value-row indices: only those rows of the value table are updated (train/trainable.py).
    trainable_rows: Optional[str] = None
    # What a non-finite loss or gradient norm does (train/nonfinite.py): stop (before saving anything after it) or
    # skip (drop that step's update; one device sync per step), stopping once more than max_skipped_steps were skipped.
    nonfinite: NonFinite = "stop"
    max_skipped_steps: int = 10

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        if self.trainable_rows is not None and not os.path.isfile(self.trainable_rows):
            raise ValueError(f"{prefix}.trainable_rows: no such file: {self.trainable_rows}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"{prefix}.max_skipped_steps: must be >= 0, got {self.max_skipped_steps}")
        for key in ("steps", "batch_size", "grad_accum", "log_every", "val_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key}: must be >= 1, got {getattr(self, key)}")
        if self.gc_every < 0:
            raise ValueError(f"{prefix}.gc_every: must be >= 0, got {self.gc_every}")
        if self.val_every < 0:
            raise ValueError(f"{prefix}.val_every: must be >= 0, got {self.val_every}")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"{prefix}.peak_flops: must be > 0 (or null to look it up), got {self.peak_flops}")


@dataclass
class CheckpointConfig:
    every: int = 200  # steps between checkpoints; the last step is always saved; 0 saves only at the end
    keep: int = 2  # newest checkpoints kept on disk
    resume: bool = True  # resume from the newest checkpoint in run_dir when there is one
    save_final: bool = True  # save at the last step (off for throwaway benchmark runs)
    keep_every: int = 0  # checkpoints at multiples of this step are permanent: never deleted by `keep` (0: none)
    # Write checkpoints in a background thread (DCP async_save) while training continues; at most one in flight.
    async_save: bool = False
    # Start from the model weights of another run (a checkpoint dir, a run dir, or an export dir with
    # model.safetensors): fresh optimizer, schedule and data. Ignored when run_dir has a checkpoint to resume from.
    init_from: Optional[str] = None

    def validate(self, prefix: str) -> None:
        if self.every < 0:
            raise ValueError(f"{prefix}.every: must be >= 0, got {self.every}")
        if self.keep_every < 0:
            raise ValueError(f"{prefix}.keep_every: must be >= 0, got {self.keep_every}")
        if self.init_from is not None and not os.path.exists(self.init_from):
            raise ValueError(f"{prefix}.init_from: no such checkpoint or directory: {self.init_from}")
        if self.keep < 1:
            raise ValueError(f"{prefix}.keep: must be >= 1, got {self.keep}")


@dataclass
class LoggingConfig:
    wandb: WandbMode = "disabled"
    project: str = "mnemo"
    run_name: Optional[str] = None
    group: Optional[str] = None  # wandb group: the runs of one sweep share one (launch.sweep sets it)
    # Per memory layer, at every log line: rows read, read entropy, dead rows (train/memory_health.py).
    memory_health: bool = False

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)


@dataclass
class DistConfig:
    """Parallel layout. World size = replicate * shard; memory_parallel divides the world."""

    replicate: int = 1  # data-parallel replicas (HSDP outer dim)
    shard: int = -1  # FSDP shard degree; -1 = world_size // replicate
    memory_parallel: int = 1  # ranks that split the value table by columns
    backend: DistBackend = "auto"  # auto: nccl on GPU, gloo on CPU
    # FSDP2: free each block's gathered parameters after its forward (True: least memory, a second all-gather in
    # backward) or keep them until backward (False: 1/3 less parameter traffic, more memory).
    reshard_after_forward: bool = True
    # dtype of FSDP's gradient reduce-scatter / all-reduce: fp32 (exact sums of bf16 compute) or bf16 (half the
    # traffic). "param" = the parameters' compute dtype (bf16 under bf16 precision).
    reduce_dtype: ReduceDtype = "fp32"
    # FSDP2 unit size: consecutive blocks sharded (gathered, reduced) together. Each unit costs a fixed host time
    # per step (copy-in, all-gather, split, chunk-cat, reduce-scatter); small models on few GPUs are host-bound,
    # and fewer, larger units cut that. Larger units hold more gathered parameters at once.
    blocks_per_unit: int = 1

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        if self.replicate < 1:
            raise ValueError(f"{prefix}.replicate: must be >= 1, got {self.replicate}")
        if self.shard == 0 or self.shard < -1:
            raise ValueError(f"{prefix}.shard: must be >= 1 or -1 (the rest of the world), got {self.shard}")
        if self.memory_parallel < 1:
            raise ValueError(f"{prefix}.memory_parallel: must be >= 1, got {self.memory_parallel}")
        if self.blocks_per_unit < 1:
            raise ValueError(f"{prefix}.blocks_per_unit: must be >= 1, got {self.blocks_per_unit}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> None:
        try:
            for f in dataclasses.fields(self):
                section = getattr(self, f.name)
                if hasattr(section, "validate"):
                    section.validate(f.name)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.run_dir:
            raise ConfigError("run_dir: must not be empty")
        conflict = weight_dtype_conflict(self)
        if self.train.weight_dtype == "bf16" and conflict:
            raise ConfigError(f"train.weight_dtype=bf16: not for this run: {conflict}")
        if self.optim.value_precision == "bf16_stochastic" and self.model.memory.value_dtype != "bfloat16":
            raise ConfigError("optim.value_precision: bf16_stochastic updates a bf16 value table; set "
                              f"model.memory.value_dtype=bfloat16 (got {self.model.memory.value_dtype})")


def weight_dtype_conflict(cfg: TrainConfig) -> Optional[str]:
    """What in the config rules out bf16 weights with fp32 masters (train.weight_dtype), or None; what the device and
    process count rule out is train/master_weights.resolve_weight_dtype's to say."""
    if cfg.train.precision == "fp32":
        return "it needs bf16 autocast (train.precision=fp32)"
    if cfg.train.grad_accum > 1:
        return f"train.grad_accum={cfg.train.grad_accum}: the micro-batches' gradients would be summed in bf16"
    if cfg.optim.adamw_kernel == "torch":
        return "optim.adamw_kernel=torch: the masters are stepped by the Triton AdamW kernel"
    if cfg.optim.grad_clip > 0 and not cfg.optim.clip_in_optimizer:
        return ("optim.clip_in_optimizer=false: a separate clipping pass would round the scaled bf16 gradients; "
                "set optim.clip_in_optimizer=true (or optim.grad_clip=0)")
    return None


def resolve_config_path(path: str) -> str:
    """A relative preset path that is not found from the working directory is taken from the repo root,
    as data paths are, so `config=configs/tiny.yaml` works from anywhere inside a clone."""
    if os.path.isabs(path) or os.path.isfile(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)
    return in_repo if os.path.isfile(in_repo) else path


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """YAML preset (optional) + dotlist overrides -> validated TrainConfig. Raises ConfigError naming the key."""
    path = resolve_config_path(path) if path is not None else None
    cfg = load_structured(TrainConfig, path, list(overrides or []), example="train.steps=100")
    cfg.validate()
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def split_cli(argv: List[str]):
    """`config=path.yaml key.sub=value ...` -> (preset path, overrides). Without config=, the default preset."""
    path = None
    overrides = []
    for arg in argv:
        if arg.startswith("config="):
            path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return (DEFAULT_PRESET if path is None else path), overrides


def parse_cli(argv: List[str]) -> TrainConfig:
    """`config=path.yaml key.sub=value ...` -> TrainConfig (configs/tiny.yaml when no config= is given)."""
    return load_config(*split_cli(argv))
