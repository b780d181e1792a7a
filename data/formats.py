"""Raw record generators, one per file format, resumable from a (offset, line) position.

Each generator yields (raw, line, end_offset, end_line): `raw` is the record before any parsing (bytes for
jsonl/text, a python value for parquet/hf, a token array for memmap); `line` is the 1-based line (or row)
for warnings; (end_offset, end_line) is where the next record starts, which is what a cursor stores.
Parsing is separate (see sources.py) so ranks and workers skip records they do not own cheaply.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from typing import Iterator, Tuple

import numpy as np

Raw = Tuple[object, int, int, int]
_CHUNK = 1 << 20


def open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard  # optional dependency, only needed for .zst files

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _seek(f, path: str, offset: int) -> None:
    if offset <= 0:
        return
    if not path.endswith((".gz", ".zst")):
        f.seek(offset)
        return
    left = offset  # compressed streams: decompress and discard up to the offset
    while left > 0:
        got = len(f.read(min(left, _CHUNK)))
        if got == 0:
            raise EOFError(f"{path}: shorter than resume offset {offset}")
        left -= got


def jsonl_records(path: str, offset: int, line: int) -> Iterator[Raw]:
    """One record per non-blank line (blank lines are not records, so they never take a position)."""
    with open_binary(path) as f:
        _seek(f, path, offset)
        for raw in f:
            offset += len(raw)
            line += 1
            if raw.strip():
                yield raw, line, offset, line


def text_records(path: str, offset: int, line: int, split: str) -> Iterator[Raw]:
    with open_binary(path) as f:
        _seek(f, path, offset)
        if split == "file":
            data = f.read()
            if data.strip():
                yield data, 1, offset + len(data), line + data.count(b"\n")
            return
        para, start = [], 0
        for raw in f:
            offset += len(raw)
            line += 1
            if split == "line":
                if raw.strip():
                    yield raw.rstrip(b"\r\n"), line, offset, line
            elif raw.strip():
                if not para:
                    start = line
                para.append(raw)
            elif para:
                yield b"".join(para).rstrip(b"\r\n"), start, offset, line
                para = []
        if para:
            yield b"".join(para).rstrip(b"\r\n"), start, offset, line


def parquet_records(path: str, offset: int, field: str) -> Iterator[Raw]:
    import pyarrow.parquet as pq  # optional dependency, only needed for parquet sources

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise KeyError(f"no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    first = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if first + n <= offset:
            first += n
            continue
        values = pf.read_row_group(rg, columns=[field]).column(0).to_pylist()
        for i in range(max(0, offset - first), n):
            row = first + i
            yield values[i], row + 1, row + 1, row + 1
        first += n


def hf_records(files, offset: int, name, config, split: str) -> Iterator[Raw]:
    import datasets  # optional dependency, only needed for hf sources

    kwargs = {"data_files": list(files)} if files else {}
    ds = datasets.load_dataset(name, config, split=split, streaming=True, **kwargs)
    if offset:
        ds = ds.skip(offset)
    for i, row in enumerate(ds, start=offset):
        yield row, i + 1, i + 1, i + 1


def hf_builder(path: str) -> str:
    name = path.lower()
    for comp in (".gz", ".zst"):
        name = name[: -len(comp)] if name.endswith(comp) else name
    ext = os.path.splitext(name)[1]
    return {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".txt": "text",
            ".csv": "csv"}.get(ext, "json")


class MemmapShard:
    """A pretokenized shard: flat token file + int64 document offsets (n_docs + 1)."""

    def __init__(self, directory: str, meta: dict, dtype: str):
        self.tokens = np.memmap(os.path.join(directory, meta["tokens"]), dtype=dtype, mode="r")
        self.offsets = np.load(os.path.join(directory, meta["offsets"]), mmap_mode="r")


def memmap_records(shard: MemmapShard, offset: int) -> Iterator[Raw]:
    offs = np.asarray(shard.offsets)
    toks = shard.tokens
    for i in range(offset, len(offs) - 1):
        yield toks[offs[i]:offs[i + 1]], i + 1, i + 1, i + 1


def read_index(directory: str) -> dict:
    with open(os.path.join(directory, "index.json")) as f:
        return json.load(f)
