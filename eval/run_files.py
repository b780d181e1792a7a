"""What an evaluation reads from the run that wrote a checkpoint: its directory, tokenizer and data config."""
from __future__ import annotations

import os
from typing import Optional

from omegaconf import OmegaConf

from model.checkpoint import run_dir_of  # noqa: F401  (re-exported: what eval reads of a run)


def run_config(run_dir: str):
    """The run's config.yaml (None when it has none)."""
    path = os.path.join(run_dir, "config.yaml")
    return OmegaConf.load(path) if os.path.isfile(path) else None


def resolve_tokenizer(tokenizer: Optional[str], run_dir: str):
    """`tokenizer` when given; else the run's copy (tokenizer.model), else data.tokenizer of its config.yaml."""
    from data import load_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    copied = os.path.join(run_dir, "tokenizer.model")
    if os.path.isfile(copied):
        return load_tokenizer(copied)
    cfg = run_config(run_dir)
    spec = OmegaConf.select(cfg, "data.tokenizer") if cfg is not None else None
    if not spec:
        raise ValueError(f"tokenizer: none given and none found in {run_dir} (tokenizer.model or config.yaml data.tokenizer)")
    return load_tokenizer(spec)


def data_config(run_dir: str):
    """The run's DataConfig (validation NLL on its val sources)."""
    from data import DataConfig

    cfg = run_config(run_dir)
    if cfg is None or OmegaConf.select(cfg, "data") is None:
        raise ValueError(f"val_batches: {run_dir}/config.yaml with a data section is needed for validation NLL")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data))
