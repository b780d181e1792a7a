"""Model FLOPs utilisation: the training FLOPs a step's tokens needed (model/flops.py), over what the devices
could do at their dense bf16 peak.

The peak comes from `train.peak_flops` (FLOP/s per device) when set, else from the CUDA device's name; on a CPU,
or a GPU not in the table, without a configured value there is no MFU.
"""
from __future__ import annotations

from typing import Optional

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks per device, FLOP/s, from the vendors' data sheets (SXM parts).
# Matched as substrings of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("V100", 125e12),  # fp16 tensor cores (V100 has no bf16)
)


def peak_flops_of(device_name: str) -> Optional[float]:
    for key, peak in PEAK_BF16_FLOPS:
        if key in device_name:
            return peak
    return None


def device_peak_flops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    """FLOP/s per device: the configured value, else the table's for this CUDA device, else None."""
    if configured:
        return float(configured)
    if device.type == "cuda":
        return peak_flops_of(torch.cuda.get_device_name(device))
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token: int, peak_flops: float) -> float:
    return tokens_per_s_per_device * flops_per_token / peak_flops
