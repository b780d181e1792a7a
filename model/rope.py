"""Rotary position embeddings (half-split "rotate_half" layout), tables indexed by explicit positions.

Positions are passed per token ([B, L]) rather than implied by the sequence offset, so left-padded batches
can start every sequence at position 0.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        # Derived from the config, so not saved in checkpoints (persistent=False); init_weights() rebuilds them.
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)

    def reset_parameters(self) -> None:
        device = self.cos.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim))
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64, device=device), inv_freq)
        with torch.no_grad():
            self.cos.copy_(angles.cos())
            self.sin.copy_(angles.sin())

    def forward(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L] int -> (cos, sin) [B, L, head_dim/2] fp32."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, head_dim]; cos/sin [B, L, head_dim/2]. Rotation in fp32, result in x.dtype."""
    xf = x.to(torch.promote_types(x.dtype, cos.dtype))
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)
