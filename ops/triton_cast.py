"""Triton elementwise cast (see ops/cast.py): 16-byte loads, one store per element."""
import torch
import triton
import triton.language as tl


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask)
    tl.store(dst_ptr + offs, x.to(dst_ptr.dtype.element_ty), mask=mask)


def cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous src -> a new tensor of `dtype` with the same shape."""
    out = torch.empty(src.shape, dtype=dtype, device=src.device)
    n = src.numel()
    if n:
        block = 8192
        _cast_kernel[(triton.cdiv(n, block),)](src, out, n, BLOCK=block, num_warps=8)
    return out
