"""Triton casts: an elementwise cast kernel (see ops/cast.py) and the fp32 -> bf16 rounding every kernel stores with.

Triton's own fp32 -> bf16 conversion rounds to nearest even on a GPU (one instruction) but truncates under the CPU
interpreter (TRITON_INTERPRET=1). A kernel that stores bf16 copies of fp32 values (a master's copy, a cast table) must
give torch's `.to(torch.bfloat16)` bit for bit on both, so it rounds with `round_to` below: the GPU's conversion, and
under the interpreter the same rounding spelled in integer operations (on a GPU those cost the table cast 2%:
BENCHMARKS.md, "the cast kernel").
"""
import os

import torch
import triton
import triton.language as tl


_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def bf16_nearest_even(x):
    """fp32 -> bf16 rounded to nearest even, as torch's `.to(torch.bfloat16)`. NaN stays a NaN."""
    if _INTERPRETED:
        xi = x.to(tl.uint32, bitcast=True)
        rounded = xi + 0x7FFF + ((xi >> 16) & 1)
        hi = tl.where(x != x, (xi >> 16) | 0x40, rounded >> 16)
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x stored as `dtype`: bf16 by `bf16_nearest_even`, any other dtype by Triton's conversion."""
    if dtype == tl.bfloat16:
        return bf16_nearest_even(x)
    else:
        return x.to(dtype)


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask)
    if src_ptr.dtype.element_ty == tl.float32:
        y = round_to(x, dst_ptr.dtype.element_ty)
    else:
        y = x.to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + offs, y, mask=mask)


def cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous src -> a new tensor of `dtype` with the same shape."""
    out = torch.empty(src.shape, dtype=dtype, device=src.device)
    n = src.numel()
    if n:
        block = 8192
        _cast_kernel[(triton.cdiv(n, block),)](src, out, n, BLOCK=block, num_warps=8)
    return out
