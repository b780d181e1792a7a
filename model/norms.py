"""RMSNorm, computed in fp32."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32 (fp64 stays fp64), times `weight` (when given) before one cast back to
    x.dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


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
            return rms_normalize(x, self.eps, self.weight)
        return rms_normalize(x, self.eps) * self.weight
