"""Deterministic weight initialisation under the torch RNG (works after meta-device construction + to_empty).

Every parameter and buffer is written, biases included: linear and embedding weights ~ N(0, std) (memory layers
may give their output projections another std), biases 0;
our own modules (norms, RoPE tables, value tables, sub-keys) reset their direct parameters/buffers.
Modules are visited in registration order, so the same seed gives the same weights.
"""
from __future__ import annotations

import torch
from torch import nn

from .memory import MemoryLayer, ValuePool
from .norms import RMSNorm
from .rope import RotaryEmbedding

# Our modules; reset_parameters() of each touches only its direct parameters/buffers.
OWN_INIT = (RMSNorm, RotaryEmbedding, ValuePool, MemoryLayer)


@torch.no_grad()
def init_module(root: nn.Module, std: float) -> None:
    # Linear layers with their own std (memory projections) are drawn in the same order as all others.
    own_std = {}
    for module in root.modules():
        if isinstance(module, MemoryLayer):
            own_std.update(module.projection_init_stds())
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=own_std.get(module, std))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, OWN_INIT):
            module.reset_parameters()
