"""Differentiable dtype cast of a large table (the memory's value table), fast on CUDA.

The value table is cast to bf16 once per training forward and its gradient back to fp32 once per backward.
torch's bf16 -> fp32 copy takes the generic, non-vectorised elementwise path on CUDA, well below the copy
bandwidth (BENCHMARKS.md), so both directions go through one plain Triton kernel on CUDA.
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
        out = _triton_cast(grad, ctx.src_dtype) if grad.is_cuda and grad.is_contiguous() else None
        return (grad.to(ctx.src_dtype) if out is None else out), None


def cast_table(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src cast to dtype, differentiable (the gradient is cast back to src.dtype)."""
    if src.dtype == dtype:
        return src
    return _Cast.apply(src, dtype)
