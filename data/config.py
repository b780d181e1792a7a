"""Data configuration: which sources feed the train and val splits, and how they are packed.

Relative paths are resolved against the repository root (not the cwd), so the bundled defaults work
from any directory inside a clone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, get_args

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = "data/corpus"

# Choices are Literal types, so OmegaConf rejects other values by key; validate() covers configs built in code.
SourceType = Literal["auto", "jsonl", "text", "parquet", "hf", "memmap"]
TextSplit = Literal["file", "paragraph", "line"]
SOURCE_TYPES = get_args(SourceType)
TEXT_SPLITS = get_args(TextSplit)


def resolve_path(path: str) -> str:
    """Absolute paths pass through; relative ones are taken relative to the repo root."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else REPO_ROOT / p)


@dataclass
class SourceConfig:
    # Files, directories (searched recursively) or globs. Each entry must match at least one file.
    paths: List[str] = field(default_factory=list)
    # auto: from the file extension (.jsonl/.json[.gz|.zst] -> jsonl, .parquet, .txt[.gz|.zst] -> text,
    # a directory holding index.json -> memmap). hf: `datasets.load_dataset(..., streaming=True)`.
    type: SourceType = "auto"
    text_field: str = "text"
    weight: float = 1.0  # relative sampling weight in the train mixture (per document)
    text_split: TextSplit = "paragraph"  # plain text only: one document per file, per blank-line paragraph, or per line
    hf_name: Optional[str] = None  # hf only: builder or hub name; None -> inferred from the file extension
    hf_config: Optional[str] = None
    hf_split: str = "train"

    def validate(self, prefix: str) -> None:
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"{prefix}.type: unknown source type {self.type!r}; allowed: {', '.join(SOURCE_TYPES)}")
        if not self.paths and not (self.type == "hf" and self.hf_name):
            raise ValueError(f"{prefix}.paths: empty; give files, directories or globs")
        if any(not isinstance(p, str) or not p for p in self.paths):
            raise ValueError(f"{prefix}.paths: every entry must be a non-empty string, got {list(self.paths)!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"{prefix}.text_field: must be a non-empty string")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"{prefix}.weight: must be a finite number > 0, got {self.weight!r}")
        if self.text_split not in TEXT_SPLITS:
            raise ValueError(f"{prefix}.text_split: {self.text_split!r} not one of {', '.join(TEXT_SPLITS)}")


def _default_train() -> List[SourceConfig]:
    return [SourceConfig(paths=[f"{CORPUS_DIR}/wiki_leads.train.jsonl.gz"])]


def _default_val() -> List[SourceConfig]:
    return [SourceConfig(paths=[f"{CORPUS_DIR}/wiki_leads.val.jsonl.gz"])]


@dataclass
class DataConfig:
    train: List[SourceConfig] = field(default_factory=_default_train)
    val: List[SourceConfig] = field(default_factory=_default_val)
    tokenizer: str = f"{CORPUS_DIR}/tokenizer.model"  # a sentencepiece .model path, or "byte"
    seq_len: int = 256  # batches are [B, seq_len + 1]
    seed: int = 0
    strict: bool = False  # bad records / unreadable files raise instead of being skipped and counted
    epochs: Optional[int] = None  # train: passes over the data, None = endless (val: always one pass)
    shuffle_files: bool = True  # train: permute each source's file order every epoch (under seed)
    # background tokenization processes (0: in the training process; null: auto, see data.loader.auto_num_workers)
    num_workers: Optional[int] = None
    prefetch: int = 4  # chunks of documents buffered per worker
    chunk_docs: int = 64  # documents per worker message
    pin_memory: bool = True  # pin batches when CUDA is available
    max_warnings: int = 5  # bad-input warnings (with file:line) per loader before going quiet

    def validate(self, prefix: str = "data") -> None:
        for split in ("train", "val"):
            sources = getattr(self, split)
            if not sources:
                raise ValueError(f"{prefix}.{split}: no sources; give at least one")
            for i, src in enumerate(sources):
                if not isinstance(src, SourceConfig):
                    raise ValueError(f"{prefix}.{split}[{i}]: expected a source mapping, got {type(src).__name__}")
                src.validate(f"{prefix}.{split}[{i}]")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"{prefix}.tokenizer: give a sentencepiece .model path or 'byte'")
        for key, low in (("seq_len", 1), ("num_workers", 0), ("prefetch", 1), ("chunk_docs", 1), ("max_warnings", 0)):
            val = getattr(self, key)
            if key == "num_workers" and val is None:
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise ValueError(f"{prefix}.{key}: must be an integer >= {low}, got {val!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or isinstance(self.epochs, bool)
                                        or self.epochs < 1):
            raise ValueError(f"{prefix}.epochs: must be null (endless) or an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"{prefix}.seed: must be an integer >= 0, got {self.seed!r}")
