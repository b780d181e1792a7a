"""Pretokenize a corpus into memory-mapped token shards: the fast path for big runs.

    python -m data.pretokenize --input 'corpus/*.jsonl.zst' --tokenizer data/corpus/tokenizer.model \
        --output shards/ [--text-field text] [--type auto] [--shard-tokens 100000000] [--workers 4] \
        [--shuffle-seed 0]

Writes OUT/shard_NNNNN.bin (flat token ids, uint16 when the vocab fits, else uint32), OUT/shard_NNNNN.idx.npy
(int64 document offsets, n_docs + 1) and, last, OUT/index.json (so a half-written directory is never read).
Documents keep their source order (or, with --shuffle-seed, are permuted within each shard) and carry no
BOS/EOS: the loader adds them, exactly as for text sources.
A source config then points at OUT (type memmap, or auto: a directory with index.json).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
from multiprocessing import get_context
from typing import Iterator, List

import numpy as np

from data.sources import Reader, SourceSpec, Warner
from data.tokenizer import load_tokenizer

_TOK = None


def _init(tokenizer) -> None:
    global _TOK  # per worker process, set once by the pool initializer
    _TOK = tokenizer


def _encode(texts: List[str]) -> List[np.ndarray]:
    return [np.asarray(_TOK.encode(t), dtype=np.int64) for t in texts]


def _text_chunks(spec: SourceSpec, strict: bool, skipped: collections.Counter, size: int = 256) -> Iterator[list]:
    warn = Warner(5, strict)
    reader = Reader(spec, 0, 0, shuffle=False, epochs=1, strict=strict, warn=warn)
    chunk: list = []
    while True:
        rec = reader.next(parse=True)
        if rec is None:
            break
        kind, payload, where = rec
        if kind == "doc":
            chunk.append(payload)
            if len(chunk) == size:
                yield chunk
                chunk = []
        else:
            warn(kind, payload, where)
            skipped[kind] += 1
    if chunk:
        yield chunk


def _ordered_map(fn, items: Iterator, workers: int, tokenizer) -> Iterator:
    """Pool map that keeps order and holds at most 4 * workers chunks in flight (bounded memory)."""
    if workers <= 1:
        _init(tokenizer)
        yield from map(fn, items)
        return
    # spawn, not fork: a fork copies whatever locks other threads of this process hold (torch's, pyarrow's), and a
    # worker that inherits one held waits on it forever. The tokenizer travels pickled (data/tokenizer).
    with get_context("spawn").Pool(workers, initializer=_init, initargs=(tokenizer,)) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class ShardWriter:
    def __init__(self, out: str, dtype, shard_tokens: int, shuffle_seed=None):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.shuffle_seed = shuffle_seed
        self.shards: List[dict] = []
        self._docs: List[np.ndarray] = []
        self._n = 0

    def add(self, toks: np.ndarray) -> None:
        self._docs.append(toks)
        self._n += len(toks)
        if self._n >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._docs:
            return
        name = f"shard_{len(self.shards):05d}"
        if self.shuffle_seed is not None:  # streaming readers keep file order: mix documents here, once
            perm = np.random.default_rng([self.shuffle_seed, len(self.shards)]).permutation(len(self._docs))
            self._docs = [self._docs[i] for i in perm]
        offsets = np.zeros(len(self._docs) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in self._docs], out=offsets[1:])
        np.concatenate(self._docs).astype(self.dtype).tofile(os.path.join(self.out, name + ".bin"))
        np.save(os.path.join(self.out, name + ".idx.npy"), offsets)
        self.shards.append({"tokens": name + ".bin", "offsets": name + ".idx.npy", "docs": len(self._docs),
                            "n_tokens": int(offsets[-1])})
        self._docs, self._n = [], 0


def pretokenize(inputs: List[str], tokenizer_spec: str, out: str, text_field: str = "text", type: str = "auto",
                shard_tokens: int = 100_000_000, workers: int = 1, strict: bool = False, shuffle_seed=None) -> dict:
    tokenizer = load_tokenizer(tokenizer_spec)
    spec = SourceSpec.from_paths(inputs, text_field=text_field, type=type, name="--input")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "index.json")):
        os.remove(os.path.join(out, "index.json"))  # invalid until rewritten at the end
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    writer = ShardWriter(out, dtype, shard_tokens, shuffle_seed)
    skipped: collections.Counter = collections.Counter()
    for arrays in _ordered_map(_encode, _text_chunks(spec, strict, skipped), workers, tokenizer):
        for toks in arrays:
            writer.add(toks)
    writer.flush()
    index = {"version": 1, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
             "tokenizer": tokenizer.fingerprint(), "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
             "inputs": list(inputs), "text_field": text_field, "shuffle_seed": shuffle_seed, "shards": writer.shards,
             "docs": sum(s["docs"] for s in writer.shards), "n_tokens": sum(s["n_tokens"] for s in writer.shards),
             "skipped": dict(skipped)}
    if not writer.shards:
        raise ValueError(f"--input {inputs}: no documents to pretokenize")
    tmp = os.path.join(out, "index.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out, "index.json"))
    return index


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data.pretokenize", description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model or 'byte'")
    ap.add_argument("--output", required=True)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--type", default="auto", choices=["auto", "jsonl", "text", "parquet"])
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--shuffle-seed", type=int, default=None, help="shuffle documents within each shard")
    a = ap.parse_args(argv)
    idx = pretokenize(a.input, a.tokenizer, a.output, a.text_field, a.type, a.shard_tokens, a.workers, a.strict,
                      a.shuffle_seed)
    print(f"wrote {a.output}: {idx['docs']} documents, {idx['n_tokens']} tokens, {len(idx['shards'])} shards, "
          f"skipped {idx['skipped'] or 'none'}")


if __name__ == "__main__":
    main()
