"""RMSNorm, computed in fp32."""
from __future__ import annotations

import torch
from torch import nn


def _normalized(xf: torch.Tensor, eps: float) -> torch.Tensor:
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32 (fp64 stays fp64), cast back to x.dtype."""
    return _normalized(x.to(torch.promote_types(x.dtype, torch.float32)), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """keep_dtype: the output has the input's dtype even when the weight is wider (a bf16 input with an fp32
    weight gives bf16, the gain applied in fp32 before one rounding), so a bf16 residual stream's norms write bf16.
    Off: the weight's dtype promotes the product (an fp32 weight makes the output fp32)."""

    def __init__(self, dim: int, eps: float = 1e-5, keep_dtype: bool = False):
        super().__init__()
        self.eps = eps
        self.keep_dtype = keep_dtype
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_dtype:
            xf = x.to(torch.promote_types(x.dtype, torch.float32))
            return (_normalized(xf, self.eps) * self.weight.to(xf.dtype)).to(x.dtype)
        return rms_normalize(x, self.eps) * self.weight
