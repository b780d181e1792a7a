"""Tokenizers: sentencepiece (trained by `python -m data.tokenizer train ...`, see train.py) and bytes for tests.

Both map str <-> list[int] losslessly and expose bos_id / eos_id / pad_id / vocab_size.
Python strings holding lone surrogates (not encodable as UTF-8) get them replaced by U+FFFD.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import List

from data.config import resolve_path

_META = "\u2581"  # sentencepiece's whitespace marker
_SURROGATES = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. from JSON "\\ud800") have no UTF-8 form
        return _SURROGATES.sub("\ufffd", text).encode("utf-8")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; pad/bos/eos follow. No training, for tests and debugging."""

    spec = "byte"

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> List[int]:
        return list(_utf8(text))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"


class SentencePieceTokenizer:
    """Wraps a sentencepiece model. Picklable (workers get the serialized model, not a file path)."""

    def __init__(self, path: str):
        self.path = path
        self._proto = Path(path).read_bytes()
        self._load()

    def _load(self) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id, self.eos_id, self.pad_id = (int(self._sp.bos_id()), int(self._sp.eos_id()), int(self._sp.pad_id()))
        for name in ("bos_id", "eos_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"tokenizer {self.path}: model has no {name[:3].upper()} piece; retrain with one")
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]
        if self.pad_id < 0:  # e.g. Llama models: pad is never fed to the loss, eos is a safe stand-in
            self.pad_id = self.eos_id

    def __getstate__(self):
        return {"path": self.path, "_proto": self._proto}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def encode(self, text: str) -> List[int]:
        if text.isascii():
            return self._sp.encode(text)
        text = _utf8(text).decode("utf-8")
        if _META not in text:
            return self._sp.encode(text)
        # sentencepiece reads a literal U+2581 as its whitespace marker (it would decode to " "), so the
        # character itself goes in as its three byte-fallback pieces.
        parts = text.split(_META)
        ids = self._sp.encode(parts[0])
        for part in parts[1:]:
            ids.extend(self._meta_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()[:16]


def load_tokenizer(path_or_spec: str):
    """'byte' -> ByteTokenizer; otherwise a sentencepiece .model path (relative: against the repo root)."""
    if path_or_spec == "byte":
        return ByteTokenizer()
    path = resolve_path(path_or_spec)
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer: no such file {path!r} (give a sentencepiece .model path or 'byte')")
    return SentencePieceTokenizer(path)


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Raise if the tokenizer can emit ids the model's embedding cannot hold."""
    top = max(tokenizer.vocab_size, tokenizer.bos_id + 1, tokenizer.eos_id + 1, tokenizer.pad_id + 1)
    if top > vocab_size:
        raise ValueError(
            f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {top} ids "
            f"(vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, eos {tokenizer.eos_id}, pad {tokenizer.pad_id})"
        )

