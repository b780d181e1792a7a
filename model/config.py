"""Model configuration: plain dataclasses (OmegaConf structured-config friendly) with validate(prefix)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from .cli_config import check_choices

# Choices are Literal types: OmegaConf rejects other values by key, check_choices covers configs built in code.
MemoryBackend = Literal["auto", "reference", "triton"]
ProjInit = Literal["fan_in", "init_std"]
AttentionBackend = Literal["sdpa", "xformers", "flash4", "auto"]
ResidualDtype = Literal["fp32", "autocast"]
ValueDtype = Literal["float32", "bfloat16"]


@dataclass
class MemoryConfig:
    """Product-key memory (Memory+) layers in the chosen blocks: in place of their FFN, or beside it (keep_ffn)."""

    layers: List[int] = field(default_factory=list)  # explicit block indices, or use `every`/`start`
    every: Optional[int] = None  # stride form: start, start + every, ... < n_layers
    start: int = 0
    n_keys: int = 256  # sub-keys per half; the memory has n_keys**2 slots
    heads: int = 4
    knn: int = 32  # slots read per head
    k_dim: int = 256  # query/key size per head (two halves of k_dim/2)
    v_dim: Optional[int] = None  # value size; None -> model dim
    qk_norm: bool = True
    swilu: bool = True  # Memory+: out = W2 (y * silu(W1 x)); off: out = W2 y
    gate: bool = False  # out <- sigmoid(w_g . x) * out
    share_values: bool = True  # one value table for all memory layers
    # False: the memory layer takes the block's FFN slot. True: the block keeps its SwiGLU FFN and adds the memory
    # beside it, both reading the same normed input (x + ffn(n) + memory(n)): more FLOPs, dense capacity kept.
    keep_ffn: bool = False
    backend: MemoryBackend = "auto"  # see ops
    value_init_std: Optional[float] = None  # None -> v_dim ** -0.5
    # std of swilu_proj and value_proj: fan_in -> (input size) ** -0.5, as in the public code; init_std -> the
    # model's init_std like every other linear layer. A value row reaches the output through both, so their
    # scale sets how far one value update moves the output.
    proj_init: ProjInit = "init_std"
    # Under autocast in training, read the fp32 value table through one cast to the autocast dtype per forward
    # (fp32 master weights and optimizer; see model.memory.table_for_forward). False: lookups read fp32 rows.
    cast_values: bool = True
    # Storage dtype of the value table (parameter and gradient). bfloat16: lookups read it without a cast, its
    # gradient is half the bytes to sum, clip and step, and the value optimizer keeps an fp32 master copy in its
    # state (train/value_optim.py); checkpoints then hold bf16 values (the master is in the optimizer state).
    value_dtype: ValueDtype = "float32"
    # With a bf16 table in training on one process: each lookup adds its value gradient into the table's .grad
    # (one table-sized buffer for every layer, only touched rows written after the first) instead of autograd's
    # per-layer gradients and their sum (ops/lookup_into_grad.py). No effect on an fp32 or column-sharded table.
    accumulate_value_grad: bool = True
    # With accumulate_value_grad and several layers sharing the table: the layers' value gradients are added in one
    # pass when backward ends (each layer's backward computes only its weights' gradient), so every touched row is
    # read and written once per backward instead of once per layer (ops/lookup_into_grad.py, merge).
    merge_value_grads: bool = True

    def resolved_layers(self, n_layers: int) -> List[int]:
        """Sorted block indices that get a memory layer."""
        if self.every is not None:
            return list(range(self.start, n_layers, self.every))
        return sorted(int(i) for i in self.layers)

    def validate(self, prefix: str, n_layers: Optional[int] = None) -> None:
        def bad(key: str, msg: str):
            raise ValueError(f"{prefix}.{key}: {msg}")

        check_choices(self, prefix)
        if self.every is not None and len(self.layers) > 0:
            bad("every", f"set either layers ({list(self.layers)}) or every ({self.every}), not both")
        if self.every is not None and self.every < 1:
            bad("every", f"must be >= 1, got {self.every}")
        if self.start < 0:
            bad("start", f"must be >= 0, got {self.start}")
        if self.every is not None and n_layers is not None and self.start >= n_layers:
            bad("start", f"must be < n_layers ({n_layers}), got {self.start}")
        if self.keep_ffn and self.every is None and len(self.layers) == 0:
            bad("keep_ffn", "true keeps the FFN beside memory layers, but no block has one (set model.memory.layers "
                "or model.memory.every, or keep_ffn: false)")
        seen = set()
        for i in self.layers:
            if i < 0 or (n_layers is not None and i >= n_layers):
                bad("layers", f"layer index {i} out of range, allowed 0..{(n_layers or 1) - 1}")
            if i in seen:
                bad("layers", f"layer {i} listed twice in {list(self.layers)}")
            seen.add(i)
        for key in ("n_keys", "heads", "k_dim"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.k_dim % 2:
            bad("k_dim", f"must be even (two sub-key halves), got {self.k_dim}")
        if not 1 <= self.knn <= self.n_keys:
            bad("knn", f"must be in [1, n_keys={self.n_keys}], got {self.knn}")
        if self.v_dim is not None and self.v_dim < 1:
            bad("v_dim", f"must be positive (or null for the model dim), got {self.v_dim}")
        if self.value_init_std is not None and not self.value_init_std > 0:
            bad("value_init_std", f"must be > 0 (or null for v_dim**-0.5), got {self.value_init_std}")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None -> n_heads (no GQA)
    ffn_dim: Optional[int] = None  # None -> 8/3 * dim rounded up to multiple_of
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    # sdpa: torch's scaled_dot_product_attention (cuDNN on Hopper). flash4: FlashAttention-4 (optional package
    # flash-attn-4; bf16/fp16 on GPUs of compute capability >= 9.0) for causal training calls, SDPA for masked,
    # cached or fp32 calls. auto: flash4 where it can run, else sdpa. xformers: optional, imported lazily.
    attention_backend: AttentionBackend = "sdpa"
    # dtype of the residual stream between blocks: fp32, or the autocast dtype when autocast runs (bf16 under
    # train.precision=bf16; fp32 without autocast). "autocast" halves the bytes of every norm, residual add and
    # saved block input, as a model whose parameters are cast to bf16 (FSDP2 param_dtype) runs; norms still
    # compute in fp32 and round once, and parameters, their gradients and the optimizer stay fp32.
    residual_dtype: ResidualDtype = "fp32"
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)

    @property
    def v_dim(self) -> int:
        return self.dim if self.memory.v_dim is None else self.memory.v_dim

    def validate(self, prefix: str) -> None:
        def bad(key: str, msg: str):
            raise ValueError(f"{prefix}.{key}: {msg}")

        check_choices(self, prefix)
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.dim % self.n_heads:
            bad("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")
        if self.head_dim % 2:
            bad("n_heads", f"head dim dim/n_heads must be even for RoPE, got {self.head_dim}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            bad("n_kv_heads", f"must be >= 1 and divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            bad("ffn_dim", f"must be positive (or null for 8/3*dim), got {self.ffn_dim}")
        for key in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)}")
        self.memory.validate(f"{prefix}.memory", n_layers=self.n_layers)
