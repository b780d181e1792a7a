"""Read a model back from a training checkpoint, without importing `train` (eval and tools use this).

A checkpoint directory (see train/checkpoint.py) holds DCP shards under the key "model" and a meta.json
whose "model_config" is the ModelConfig the run was built with. An export directory (`python -m train.export`)
holds the same weights unsharded in model.safetensors, with config.json in place of meta.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from typing import List, Tuple

import torch

META_FILE = "meta.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


CHECKPOINTS_DIR = "checkpoints"  # <run dir>/checkpoints/step_N


def list_checkpoints(run_dir: str) -> List[str]:
    """Complete checkpoints of a run directory, oldest first (unfinished `.tmp` saves are ignored)."""
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, META_FILE)):
            steps.append(int(m.group(1)))
    return [os.path.join(root, f"step_{s}") for s in sorted(steps)]


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint directory, an export directory, or a run directory (-> its newest checkpoint)."""
    if os.path.exists(os.path.join(path, META_FILE)) or is_export_dir(path):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"checkpoint: no checkpoint found at {path} (expected {META_FILE} or checkpoints/step_N/)")
    return found[-1]


def run_dir_of(checkpoint_dir: str) -> str:
    """runs/X/checkpoints/step_N -> runs/X; any other directory (a run or an export) is its own run dir."""
    path = os.path.abspath(checkpoint_dir)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == CHECKPOINTS_DIR:
        return os.path.dirname(parent)
    return path


def is_export_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPORT_WEIGHTS))


def model_config_from_dict(d: dict):
    from .config import MemoryConfig, ModelConfig

    d = dict(d)
    memory = MemoryConfig(**d.pop("memory", {}))
    return ModelConfig(memory=memory, **d)


def model_config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


@contextlib.contextmanager
def single_process_dcp():
    """Around a DCP save or load: in one process without a process group, DCP warns on every call (even with
    no_dist=True) that it assumes a single process. That is the intent here, so that one warning is ignored,
    and only inside this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                                category=UserWarning)
        yield


def load_model(checkpoint_dir: str, device="cpu") -> Tuple[torch.nn.Module, object]:
    """Build the checkpoint's model on `device` and load its weights. Returns (model, ModelConfig)."""
    import torch.distributed.checkpoint as dcp

    path = resolve_checkpoint(checkpoint_dir)
    if is_export_dir(path):
        return load_exported(path, device)
    model, cfg = _initialised_model(os.path.join(path, META_FILE), device)
    state = {"model": model.state_dict()}
    with single_process_dcp():
        dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg


def load_exported(export_dir: str, device="cpu") -> Tuple[torch.nn.Module, object]:
    """Build an export's model on `device` with its weights (no torch.distributed). Returns (model, ModelConfig)."""
    from safetensors.torch import load_file  # optional: only exports need it

    model, cfg = _initialised_model(os.path.join(export_dir, EXPORT_CONFIG), device)
    model.load_state_dict(load_file(os.path.join(export_dir, EXPORT_WEIGHTS), device=str(device)))
    model.eval()
    return model, cfg


def _initialised_model(config_file: str, device) -> Tuple[torch.nn.Module, object]:
    """The model of the `model_config` in a checkpoint's meta.json or an export's config.json, on `device`, freshly
    initialised: buffers (RoPE tables) are in neither, and the weights are loaded over it."""
    from .transformer import Transformer

    with open(config_file) as f:
        info = json.load(f)
    if "model_config" not in info:
        raise ValueError(f"{os.path.dirname(config_file)}: {os.path.basename(config_file)} has no model_config")
    cfg = model_config_from_dict(info["model_config"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model, cfg
