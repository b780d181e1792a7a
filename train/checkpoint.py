"""Checkpoints: model and optimizer through torch.distributed.checkpoint (DCP), plus the small state needed to
continue exactly where a run stopped (step, scheduler, data position, RNG state).

Layout of `run_dir/checkpoints/step_<N>/`:
  DCP shards (*.distcp, .metadata)   model + optimizer, resharding-friendly (save on 2 ranks, load on 1)
  meta.json                          step, scheduler, data loader state, model config
  rng_rank<R>.pt                     each rank's RNG states
A checkpoint is written to `step_<N>.tmp` and renamed only once complete, so a crash mid-save never
leaves a half checkpoint that resume would pick up, and older checkpoints are deleted only afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from model.checkpoint import META_FILE, list_checkpoints, single_process_dcp


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: Dict[str, Any],
    keep: int,
) -> str:
    """Save step `step`; every rank calls this. Returns the final directory."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step}")
    tmp = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with single_process_dcp():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(dict(meta, step=step), f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore model, optimizer and this rank's RNG; return meta.json's contents."""
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"checkpoint {path}: cannot read {META_FILE}: {e}") from None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with single_process_dcp():
            dcp.load(state, checkpoint_id=path)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path}: cannot load model/optimizer state: {e}") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_path = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.exists(rng_path):  # absent when resuming at a larger world size: keep the seeded RNG
        set_rng_state(torch.load(rng_path, weights_only=False))
    return meta

