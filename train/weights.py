"""Model weights without the training state: load them from another run (`checkpoint.init_from`, finetuning and
warm starts), export a checkpoint to one consolidated safetensors file + config, and read such exports back.

Sources `load_model_weights` accepts:
  a DCP checkpoint directory (checkpoints/step_N), or a run directory (its newest checkpoint);
  an export directory: model.safetensors (full, unsharded tensors) + config.json ({"model_config": ...}).
The target model may be sharded (FSDP2, column-parallel values): each rank takes its own slice.
safetensors is imported only when an export is read or written.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from model.checkpoint import (EXPORT_CONFIG, EXPORT_WEIGHTS, META_FILE, is_export_dir, resolve_checkpoint,
                              run_dir_of, single_process_dcp)

SAFETENSORS_FILE = EXPORT_WEIGHTS


class WeightsMismatchError(ValueError):
    """The source's tensors do not fit the model (the message lists the keys)."""


def source_info(path: str) -> Tuple[str, Dict[str, Any]]:
    """(resolved path, its metadata with "model_config") of an export dir, checkpoint dir or run dir."""
    if is_export_dir(path):
        meta_path = os.path.join(path, EXPORT_CONFIG)
    else:
        path = resolve_checkpoint(path)
        meta_path = os.path.join(path, META_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    if "model_config" not in meta:
        raise ValueError(f"{meta_path}: has no model_config")
    return path, meta


def _source_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    if is_export_dir(path):
        from safetensors import safe_open

        with safe_open(os.path.join(path, SAFETENSORS_FILE), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(path).read_metadata().state_dict_metadata
    return {k[len("model."):]: tuple(v.size) for k, v in md.items() if k.startswith("model.") and hasattr(v, "size")}


def load_model_weights(path: str, model: torch.nn.Module, strict: bool = True) -> List[str]:
    """Load `path`'s model weights into `model` (plain or parallelized; every rank calls this).

    strict: every model tensor must be in the source with the same shape, and the source may hold no others.
    strict=False loads the tensors present in both with equal shapes and returns the names of the model's
    tensors left as they were (e.g. new memory layers on a dense model). Raises WeightsMismatchError.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    path = source_info(path)[0]
    target = get_model_state_dict(model)
    source = _source_shapes(path)
    wrong = [f"{k} {tuple(v.shape)} vs {source[k]}" for k, v in target.items()
             if k in source and tuple(v.shape) != source[k]]
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    if strict and (wrong or missing or unexpected):
        parts = [f"shape differs (model vs source): {', '.join(wrong)}" if wrong else "",
                 f"not in the source: {', '.join(missing)}" if missing else "",
                 f"not in the model: {', '.join(unexpected)}" if unexpected else ""]
        raise WeightsMismatchError(f"{path}: the weights do not fit the model; " + "; ".join(p for p in parts if p))
    keys = [k for k in target if k in source and tuple(target[k].shape) == source[k]]
    if is_export_dir(path):
        from safetensors import safe_open

        with safe_open(os.path.join(path, SAFETENSORS_FILE), framework="pt") as f:
            full = {k: f.get_tensor(k) for k in keys}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        import torch.distributed.checkpoint as dcp

        state = {"model": {k: target[k] for k in keys}}
        with single_process_dcp():
            dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    return [k for k in target if k not in keys]


def init_weights_from(cfg, model: torch.nn.Module, log) -> None:
    """`checkpoint.init_from`: the source's weights into a fresh run's model, after checking its architecture."""
    from .config import ConfigError
    from .resume import architecture_mismatch, format_changes

    src = cfg.checkpoint.init_from
    try:
        path, meta = source_info(src)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint.init_from: cannot read {src}: {e}") from None
    from model.checkpoint import model_config_to_dict

    mismatch = architecture_mismatch(meta["model_config"], model_config_to_dict(cfg.model))
    if mismatch:
        raise ConfigError(f"checkpoint.init_from: {path} has another architecture: {format_changes(mismatch)} "
                          f"(checkpoint -> this config)")
    try:
        load_model_weights(path, model)
    except WeightsMismatchError as e:
        raise ConfigError(f"checkpoint.init_from: {e}") from None
    log.print(f"initialised the model weights from {path} (fresh optimizer, schedule and data)")


def export_checkpoint(checkpoint: str, out_dir: str, tokenizer: Optional[str] = None) -> str:
    """Write `checkpoint`'s model as out_dir/model.safetensors + config.json (one process, any saved layout)."""
    from safetensors.torch import save_file

    from model.checkpoint import load_model, model_config_to_dict

    path, meta = source_info(checkpoint)
    model, cfg = load_model(path, device="cpu")
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, SAFETENSORS_FILE), metadata={"format": "pt"})
    info = {"model_config": model_config_to_dict(cfg), "step": meta.get("step"), "source": os.path.abspath(path)}
    with open(os.path.join(out_dir, EXPORT_CONFIG), "w") as f:
        json.dump(info, f, indent=1)
    import shutil

    run_dir = run_dir_of(path)
    tok = tokenizer or os.path.join(run_dir, "tokenizer.model")
    if os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(out_dir, "tokenizer.model"))
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):  # the run's settings, for eval (val data, ...)
        shutil.copyfile(os.path.join(run_dir, "config.yaml"), os.path.join(out_dir, "config.yaml"))
    return out_dir
