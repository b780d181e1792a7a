"""A source = an ordered list of read units (files, memmap shards, or one HF stream) plus how to parse them.

`Reader` walks a source record by record with a small JSON-able cursor (epoch, unit, offset, line), repeats
it for more epochs (file order permuted per epoch under the seed), and turns bad input into counted
records instead of exceptions (unless strict).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np

from data import formats
from data.files import detect_format, expand_paths

log = logging.getLogger("data")

# Counted reasons for skipping a record; every loader reports all of them (as skipped_<reason>).
BAD_REASONS = ("bad_json", "missing_text", "empty_text", "non_string_text", "bad_utf8", "unreadable")
SKIP = ("skip", None, None)  # a record read past without parsing (another rank's or worker's)


class DataError(ValueError):
    """Bad input in strict mode; the message starts with file:line."""


@dataclass
class SourceSpec:
    name: str  # config key, e.g. data.train[0], for messages
    units: List[Tuple[str, str, int]]  # (format, path, shard index or -1)
    text_field: str = "text"
    text_split: str = "paragraph"
    weight: float = 1.0
    hf: Optional[dict] = None
    memmap_meta: dict = field(default_factory=dict)

    @classmethod
    def from_paths(cls, paths: List[str], text_field: str = "text", type: str = "auto", name: str = "input",
                   text_split: str = "paragraph", weight: float = 1.0, hf_name=None, hf_config=None,
                   hf_split: str = "train") -> "SourceSpec":
        files = expand_paths(list(paths), name) if paths else []
        if type == "hf":
            builder = hf_name or formats.hf_builder(files[0])
            hf = {"name": builder, "config": hf_config, "split": hf_split, "files": files}
            return cls(name, [("hf", builder, -1)], text_field, text_split, weight, hf=hf)
        units, meta = [], {}
        for f in files:
            fmt = detect_format(f) if type == "auto" else type
            if fmt is None:
                raise ValueError(f"{name}: cannot tell the format of {f!r} from its name; set {name}.type")
            if fmt == "memmap":
                meta[f] = formats.read_index(f)
                units.extend(("memmap", f, i) for i in range(len(meta[f]["shards"])))
            else:
                units.append((fmt, f, -1))
        return cls(name, units, text_field, text_split, weight, memmap_meta=meta)

    @classmethod
    def from_config(cls, src, name: str, resolve) -> "SourceSpec":
        return cls.from_paths([resolve(p) for p in src.paths], src.text_field, src.type, name, src.text_split,
                              src.weight, src.hf_name, src.hf_config, src.hf_split)


class Reader:
    """Sequential records of one source. cursor = [epoch, unit position in the epoch's order, offset, line]."""

    def __init__(self, spec: SourceSpec, seed: int, index: int, shuffle: bool, epochs, strict: bool, warn):
        self.spec, self.seed, self.index = spec, seed, index  # epochs: None = endless
        self.shuffle, self.epochs, self.strict, self.warn = shuffle, epochs, strict, warn
        self._shards = {}
        self.seek([0, 0, 0, 0])

    def seek(self, cursor) -> None:
        self.epoch, self.upos, self.offset, self.line = (int(c) for c in cursor)
        self._order = self._epoch_order(self.epoch)
        self._gen = None
        self._records_in_epoch = 1 if (self.upos or self.offset) else 0

    @property
    def cursor(self) -> list:
        return [self.epoch, self.upos, self.offset, self.line]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.spec.units)
        if not self.shuffle or n < 2:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.index, epoch]).permutation(n)

    def _where(self, line: Optional[int] = None) -> str:
        fmt, path, shard = self.spec.units[self._order[self.upos]]
        return f"{path}:{self.line if line is None else line}" if shard < 0 else f"{path}[shard {shard}]:{line}"

    def _open(self):
        fmt, path, shard = self.spec.units[self._order[self.upos]]
        if fmt == "jsonl":
            return formats.jsonl_records(path, self.offset, self.line)
        if fmt == "text":
            return formats.text_records(path, self.offset, self.line, self.spec.text_split)
        if fmt == "parquet":
            return formats.parquet_records(path, self.offset, self.spec.text_field)
        if fmt == "hf":
            h = self.spec.hf
            return formats.hf_records(h["files"], self.offset, h["name"], h["config"], h["split"])
        if fmt == "memmap":
            key = (path, shard)
            if key not in self._shards:
                meta = self.spec.memmap_meta[path]
                self._shards[key] = formats.MemmapShard(path, meta["shards"][shard], meta["dtype"])
            return formats.memmap_records(self._shards[key], self.offset)
        raise ValueError(f"{self.spec.name}: unknown format {fmt!r}")

    def _next_unit(self) -> bool:
        """Advance to the next unit; False when the source is exhausted (last epoch done)."""
        self._gen, self.offset, self.line = None, 0, 0
        self.upos += 1
        if self.upos < len(self._order):
            return True
        if not self._records_in_epoch:
            raise ValueError(f"{self.spec.name}: no records in any of its files")
        if self.epochs is not None and self.epoch + 1 >= self.epochs:
            return False
        self.epoch, self.upos, self._records_in_epoch = self.epoch + 1, 0, 0
        self._order = self._epoch_order(self.epoch)
        return True

    def next(self, parse: bool):
        """-> (kind, payload, where) | SKIP | None at the end. kind: 'doc' (text), 'tokens', or a bad reason."""
        while self.upos < len(self._order):
            try:
                if self._gen is None:
                    self._gen = self._open()
                raw, line, self.offset, self.line = next(self._gen)
            except StopIteration:
                if not self._next_unit():
                    return None
                continue
            except Exception as e:  # unreadable, truncated, corrupt: one counted record, then the next file
                where, msg = self._where(), f"{type(e).__name__}: {e}"
                self._records_in_epoch += 1
                self._next_unit()  # at the end of a finite source this leaves upos past the last unit
                return ("unreadable", msg, where) if parse else SKIP
            self._records_in_epoch += 1
            return self._parse(raw, line) if parse else SKIP
        return None

    def _parse(self, raw, line: int):
        fmt = self.spec.units[self._order[self.upos]][0]
        if fmt == "memmap":
            return ("tokens", raw, None)
        where = None
        if fmt in ("jsonl", "text"):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return ("bad_utf8", str(e), self._where(line))
            if fmt == "text":
                return ("doc", text, None)
            try:
                raw = json.loads(text)
            except ValueError as e:
                return ("bad_json", str(e), self._where(line))
            if not isinstance(raw, dict):
                return ("bad_json", f"expected an object, got {type(raw).__name__}", self._where(line))
        if fmt in ("jsonl", "hf"):
            if not isinstance(raw, dict) or raw.get(self.spec.text_field) is None:
                return ("missing_text", f"no field {self.spec.text_field!r}", self._where(line))
            raw = raw[self.spec.text_field]
        elif raw is None:
            return ("missing_text", f"null {self.spec.text_field!r}", self._where(line))
        if not isinstance(raw, str):
            return ("non_string_text", f"{self.spec.text_field!r} is {type(raw).__name__}", self._where(line))
        if not raw.strip():
            return ("empty_text", f"{self.spec.text_field!r} is empty", self._where(line))
        return ("doc", raw, where)


class Warner:
    """Logs the first `limit` bad records with file:line; raises instead in strict mode."""

    def __init__(self, limit: int, strict: bool):
        self.left, self.strict = limit, strict

    def __call__(self, reason: str, msg: str, where: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason}: {msg} (data.strict is on; set it off to skip and count)")
        if self.left > 0:
            self.left -= 1
            log.warning("%s: skipped (%s): %s%s", where, reason, msg, "" if self.left else " [further warnings off]")


def files_text(spec: SourceSpec) -> str:
    paths = list(dict.fromkeys(path for _, path, _ in spec.units))
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return ", ".join(paths[:3]) + more


def check_usable(spec: SourceSpec) -> None:
    """Raise DataError, naming the source and its files, unless one pass over it finds a usable document.

    Stops at the first usable record, so a good source costs one read. Without this, an endless train
    stream over a source whose every record is skipped (binary junk, empty texts) would loop forever.
    """
    reader = Reader(spec, 0, 0, shuffle=False, epochs=1, strict=False, warn=None)
    counts: dict = {}
    first = None
    while True:
        try:
            rec = reader.next(parse=True)
        except ValueError:  # no records at all
            rec = None
        if rec is None:
            break
        kind, payload, where = rec
        if kind in ("doc", "tokens"):
            return
        counts[kind] = counts.get(kind, 0) + 1
        if first is None:
            first = f"{where}: {kind}: {' '.join(str(payload).split())[:200]}"
    if not counts:
        raise DataError(f"{spec.name}: no records in {files_text(spec)}")
    total = sum(counts.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    raise DataError(f"{spec.name}: no usable document in {files_text(spec)}: all {total} records were skipped "
                    f"({reasons}); the first at {first}")


def iter_documents(spec: SourceSpec, strict: bool = False, max_warnings: int = 5) -> Iterator[str]:
    """Every good document text of one pass over a source, in file order (used by tokenizer training)."""
    warn = Warner(max_warnings, strict)
    reader = Reader(spec, 0, 0, shuffle=False, epochs=1, strict=strict, warn=warn)
    while True:
        rec = reader.next(parse=True)
        if rec is None:
            return
        kind, payload, where = rec
        if kind == "doc":
            yield payload
        elif kind != "tokens":
            warn(kind, payload, where)
