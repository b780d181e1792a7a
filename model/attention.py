"""Causal grouped-query attention with RoPE and an optional KV cache for incremental decoding."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import ops

from .config import ModelConfig
from .rope import apply_rope


class KVCache:
    """Keys/values of every layer: [batch, max_len, n_kv_heads, head_dim] each, written at start_pos."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, device=None, dtype=None):
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k: List[torch.Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, L, Hkv, hd] at positions start_pos.. and return all keys/values [B, start_pos+L, ...]."""
        B, L = k.shape[:2]
        end = start_pos + L
        if B > self.batch_size or end > self.max_len:
            raise ValueError(
                f"KVCache: batch {B} x positions [{start_pos}, {end}) exceed the cache ({self.batch_size} x {self.max_len})"
            )
        self.k[layer][:B, start_pos:end] = k
        self.v[layer][:B, start_pos:end] = v
        return self.k[layer][:B, :end], self.v[layer][:B, :end]


def flash4_wanted(backend: str, head_dim: int) -> bool:
    """Whether causal calls go to FlashAttention-4: always under "flash4"; under "auto" when the package is
    installed and the GPU and head size suit it (decided once, at construction: nothing here may run inside a
    compiled forward)."""
    if backend == "flash4":
        return True
    if backend != "auto" or not torch.cuda.is_available():
        return False
    return attention_kernel(backend, head_dim, "cuda", torch.bfloat16) == "flash4"


def _choose_kernel(backend: str, head_dim: int, device, dtype: Optional[torch.dtype]) -> Tuple[str, Optional[str]]:
    """(the kernel, why flash4 is not it: None when flash4 was not considered or is chosen)."""
    if backend not in ("flash4", "auto"):
        return backend, None
    problem = ops.flash_attention.flash4_problem(torch.device(device), dtype, head_dim)
    if problem is None:
        return "flash4", None
    if backend == "flash4":
        raise ValueError(f"model.attention_backend: flash4 cannot run here: {problem}; use sdpa, or auto to fall back "
                         "to it")
    return "sdpa", problem


def attention_kernel(backend: str, head_dim: int, device, dtype: Optional[torch.dtype]) -> str:
    """The kernel a run's causal training calls take on `device` under autocast `dtype` (None: fp32): "flash4",
    "sdpa" or "xformers". Raises ValueError naming model.attention_backend when flash4 was asked for and cannot
    run there."""
    return _choose_kernel(backend, head_dim, device, dtype)[0]


def prepare_attention(cfg: ModelConfig, device, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Check cfg.attention_backend against the run's device and autocast dtype before any compute
    (attention_kernel) and load FlashAttention-4 now when it will be used. A line for the log, or None."""
    backend = cfg.attention_backend
    kernel, problem = _choose_kernel(backend, cfg.head_dim, device, dtype)
    if kernel == "flash4":
        ops.flash_attention.prepare()
        version = ops.flash_attention.installed_version()
        return f"attention: FlashAttention-4 {version} (model.attention_backend={backend})"
    if problem is not None and torch.device(device).type == "cuda":
        return f"attention: sdpa (model.attention_backend=auto: flash4 not used, {problem})"
    return None


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.backend = backend
        self.flash4 = flash4_wanted(backend, self.head_dim)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        layer_id: int = 0,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """x [B, L, dim]; mask [B, 1, L, S] bool (True = attend) or None for plain causal attention over x."""
        B, L, _ = x.shape
        q = apply_rope(self.wq(x).view(B, L, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, L, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.update(layer_id, start_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        plain_causal = mask is None and cache is None
        if self.flash4 and plain_causal and q.is_cuda and q.dtype in ops.flash_attention.DTYPES:
            out = ops.flash_attention.flash_attention(q, k, v)
        elif self.backend == "xformers" and mask is None:
            out = self._xformers(q, k, v)
        else:
            gqa = self.n_heads != self.n_kv_heads
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=mask is None, enable_gqa=gqa,
            ).transpose(1, 2)
        return self.wo(out.reshape(B, L, -1))

    def _xformers(self, q, k, v):
        try:  # optional dependency: only needed when attention_backend == "xformers"
            from xformers.ops import LowerTriangularMask, memory_efficient_attention
        except ImportError as e:
            raise ImportError("model.attention_backend=xformers needs the xformers package (pip install xformers)") from e
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        return memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask())
