"""Check the files a run reads before any compute: the tokenizer, every data source, the eval task files, and that
a resumed run keeps the tokenizer it was trained with. Each problem is a ConfigError naming the key."""
from __future__ import annotations

import os
from typing import List

from omegaconf import OmegaConf

from data import DataError, load_tokenizer
from data.config import resolve_path
from data.sources import SourceSpec, check_usable
from model.checkpoint import list_checkpoints

from .config import ConfigError, TrainConfig

TOKENIZER_COPY = "tokenizer.model"  # the run directory's copy of the tokenizer it trains with


def load_run_tokenizer(cfg: TrainConfig):
    try:
        return load_tokenizer(cfg.data.tokenizer)
    except FileNotFoundError as e:
        raise ConfigError(f"data.{e}") from None
    except Exception as e:  # sentencepiece's parse errors of a file that is not a model
        msg = " ".join(str(e).split())
        raise ConfigError(f"data.tokenizer: cannot load {resolve_path(cfg.data.tokenizer)} as a sentencepiece "
                          f"model: {msg}") from None


def check_sources(cfg: TrainConfig) -> None:
    """Every path matches files, and every source has at least one usable document."""
    for split in ("train", "val"):
        for i, src in enumerate(getattr(cfg.data, split)):
            name = f"data.{split}[{i}]"
            try:
                check_usable(SourceSpec.from_config(src, name, resolve_path))
            except (FileNotFoundError, DataError) as e:
                raise ConfigError(str(e)) from None
            except ValueError as e:
                msg = str(e)
                raise ConfigError(msg if msg.startswith(name) else f"{name}: {msg}") from None


def check_eval_tasks(cfg: TrainConfig) -> None:
    if not cfg.eval.tasks:
        return
    from eval import load_eval_tasks

    try:
        load_eval_tasks(cfg.eval)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
        if msg.startswith("qa_wikidata_path"):
            msg = f"eval.{msg}"
        raise ConfigError(msg if msg.startswith("eval.") else f"eval.tasks: {msg}") from None


def _describe(fingerprint: str) -> str:
    return "the byte tokenizer" if fingerprint == "byte" else f"sentencepiece model {fingerprint}"


def recorded_tokenizer(run_dir: str):
    """Fingerprint of the tokenizer an earlier run in `run_dir` trained with, or None when unknown."""
    copy = os.path.join(run_dir, TOKENIZER_COPY)
    if os.path.isfile(copy):
        try:
            return load_tokenizer(copy).fingerprint()
        except Exception:
            return None
    saved = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(saved):
        try:
            return "byte" if OmegaConf.select(OmegaConf.load(saved), "data.tokenizer") == "byte" else None
        except Exception:
            return None
    return None


def check_run_tokenizer(cfg: TrainConfig, tokenizer) -> List[str]:
    """A resume must use the tokenizer the checkpoints were trained with (ConfigError otherwise). Returns
    warnings: a fresh start in a run directory that holds another tokenizer's copy (it is replaced)."""
    old = recorded_tokenizer(cfg.run_dir)
    new = tokenizer.fingerprint()
    if old is None or old == new:
        return []
    if cfg.checkpoint.resume and list_checkpoints(cfg.run_dir):
        raise ConfigError(
            f"data.tokenizer: {cfg.data.tokenizer!r} is {_describe(new)}, but the checkpoints in {cfg.run_dir} were "
            f"trained with {_describe(old)}; resume with that tokenizer, or start over in a new run_dir "
            f"(or with checkpoint.resume=false)")
    return [f"warning: {cfg.run_dir} holds an earlier run's tokenizer ({_describe(old)}); this run uses "
            f"{_describe(new)} and replaces it"]


def check_inputs(cfg: TrainConfig) -> List[str]:
    """All input checks of a training run; returns warnings to print. Cheap: reads one record per source."""
    tokenizer = load_run_tokenizer(cfg)
    check_sources(cfg)
    check_eval_tasks(cfg)
    return check_run_tokenizer(cfg, tokenizer)
