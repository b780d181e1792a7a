"""Where a model runs and in what precision: one policy for training and evaluation.

`auto` takes the GPU when there is one (under torchrun the process's own, LOCAL_RANK) and bf16 autocast on it;
on a CPU the model runs in fp32. Autocast dtypes are returned as None for fp32: no autocast at all.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Union

import torch

from .cli_config import ConfigError

AUTOCAST_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}


def pick_device(name: str, key: str = "device") -> torch.device:
    """auto | cpu | cuda -> this process's device; `key` names the setting in the error for a missing GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: cuda requested but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_dtype(precision: Union[str, torch.dtype, None], device: torch.device,
               key: str = "precision") -> Optional[torch.dtype]:
    """The autocast dtype of `precision` (auto, a name of AUTOCAST_DTYPES or a torch.dtype) on `device`;
    None: fp32, no autocast. auto (or None) is bf16 on a GPU and fp32 elsewhere."""
    if isinstance(precision, torch.dtype):
        return None if precision == torch.float32 else precision
    name = "auto" if precision is None else str(precision).lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"{key}: must be auto or one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
    return AUTOCAST_DTYPES[name]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` on `device`, or a no-op for fp32 (None)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
