"""Unigram entropy of a split: the loss (nats/token) of a model that knows only token frequencies."""
from __future__ import annotations

import numpy as np

from data.config import DataConfig, resolve_path
from data.sources import SourceSpec
from data.stream import DocStream, initial_state


def unigram_entropy(cfg: DataConfig, tokenizer, split: str = "val") -> float:
    """Over one pass of every document of the split (BOS/EOS included, as the packed rows hold them)."""
    if split not in ("train", "val"):
        raise ValueError(f"split: {split!r} is not 'train' or 'val'")
    specs = [SourceSpec.from_config(s, f"data.{split}[{i}]", resolve_path) for i, s in enumerate(getattr(cfg, split))]
    stream = DocStream(specs, False, cfg.seed, False, cfg.strict, tokenizer, cfg.max_warnings, 0,
                       initial_state(len(specs), 1), cfg.chunk_docs)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for chunk in stream.iter_chunks():
        toks = [item[3] for item in chunk if item[3] is not None]
        if toks:
            counts += np.bincount(np.concatenate(toks), minlength=len(counts))[: len(counts)]
    total = counts.sum()
    if total == 0:
        raise ValueError(f"data.{split}: no tokens to compute a unigram entropy from")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
