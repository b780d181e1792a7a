"""Differentiable dtype cast of a large table (the memory's value table), fast on CUDA.

torch's own fp32 -> bf16 copy runs a non-vectorised kernel on CUDA (a dtype-converting copy takes the generic
path), at about half the copy bandwidth; a 1M x 1024 table is cast once per training forward, so a plain Triton
kernel pays. Backward is the cast back to the table's dtype (torch's bf16 -> fp32 copy is already vectorised).
"""
from __future__ import annotations

import torch


def _triton_cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    try:
        from .triton_cast import cast
    except ImportError:
        return None
    return cast(src, dtype)


class _Cast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, dtype):
        ctx.src_dtype = src.dtype
        out = _triton_cast(src, dtype) if src.is_cuda and src.is_contiguous() else None
        return src.to(dtype) if out is None else out

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.src_dtype), None


def cast_table(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src cast to dtype, differentiable (the gradient is cast back to src.dtype)."""
    if src.dtype == dtype:
        return src
    return _Cast.apply(src, dtype)
