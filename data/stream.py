"""The global document order and who reads what.

Position p = 0, 1, 2, ... numbers documents globally, independent of ranks and workers:
- train: position p draws its source from the mixture weights (counter-based RNG keyed by seed and p, so
  the draw needs no history) and takes that source's next record; sources repeat for more epochs.
- val: sources are read one after another, once.
- train with data.epochs set: finite; a mixture stops when the first drawn source has no record left.
A rank owns positions p >= base with (p - base) % world_size == rank, minus `skip` (already consumed
before a world-size change). Every record, even a malformed one, takes a position, so ownership never
depends on parsing and other ranks' records are read past without being parsed.
Within a rank, own positions are cut into chunks of `chunk` documents dealt round-robin to workers, which
matches the order in which torch's DataLoader collects worker outputs: the rank's order never depends on
the number of workers.
"""
from __future__ import annotations

from typing import Iterator, List

import numpy as np

from data.sources import Reader, SourceSpec, Warner

_BLOCK = 4096


def initial_state(n_sources: int, world_size: int) -> dict:
    return {"pos": 0, "active": 0, "cursors": [[0, 0, 0, 0] for _ in range(n_sources)], "base": 0,
            "world_size": world_size, "skip": [], "partial": []}


class DocStream:
    """Iterates chunks of own documents: lists of (pos, active, cursors, tokens|None, reason|None, offset)."""

    def __init__(self, specs: List[SourceSpec], train: bool, seed: int, shuffle: bool, strict: bool, tokenizer,
                 max_warnings: int, rank: int, state: dict, chunk: int, epochs=None):
        self.specs, self.train, self.seed, self.shuffle, self.epochs = specs, train, seed, shuffle, epochs
        self.strict, self.tokenizer, self.rank, self.state, self.chunk = strict, tokenizer, rank, state, chunk
        self.max_warnings = max_warnings
        w = np.array([s.weight for s in specs], dtype=np.float64)
        self.probs = w / w.sum()

    def _draws(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x6D6978, block])
        return rng.choice(len(self.specs), size=_BLOCK, p=self.probs)

    def _tokens(self, kind, payload) -> np.ndarray:
        ids = payload if kind == "tokens" else self.tokenizer.encode(payload)
        out = np.empty(len(ids) + 2, dtype=np.int32)
        out[0], out[-1] = self.tokenizer.bos_id, self.tokenizer.eos_id
        out[1:-1] = ids
        return out

    def iter_chunks(self, worker: int = 0, n_workers: int = 1) -> Iterator[list]:
        st = self.state
        if st.get("done"):
            return
        warn = Warner(self.max_warnings, self.strict)  # per worker: each sees different bad records
        epochs = self.epochs if self.train else 1
        readers = [Reader(s, self.seed, i, self.shuffle and self.train, epochs, self.strict, warn)
                   for i, s in enumerate(self.specs)]
        for r, c in zip(readers, st["cursors"]):
            r.seek(c)
        base, world, rank = st["base"], st["world_size"], self.rank
        skip = set(st["skip"])
        partial = {int(p): int(o) for p, o in st["partial"]}
        pos, active, own_idx = st["pos"], st["active"], 0
        block, draws = -1, None
        single = len(readers) == 1
        out: list = []
        while True:
            if self.train and not single:
                if pos // _BLOCK != block:
                    block = pos // _BLOCK
                    draws = self._draws(block)
                k = int(draws[pos % _BLOCK])
            else:
                k = active
                if k >= len(readers):
                    break
            own = pos >= base and (pos - base) % world == rank and pos not in skip
            mine = own and (own_idx // self.chunk) % n_workers == worker
            if mine:
                snapshot = [r.cursor for r in readers]
            rec = readers[k].next(parse=mine)
            if rec is None:
                if self.train and not single:  # a mixture ends when its first source runs out of epochs
                    break
                active += 1  # sequential: this source is done, the same position goes to the next one
                continue
            if own:
                own_idx += 1
            if mine:
                kind, payload, where = rec
                if kind in ("doc", "tokens"):
                    toks, reason = self._tokens(kind, payload), None
                    off = partial.get(pos, 0)
                    toks = toks[off:] if off else toks
                else:
                    warn(kind, payload, where)
                    toks, reason, off = None, kind, 0
                out.append((pos, active, snapshot, toks, reason, off))
                if own_idx % self.chunk == 0:
                    yield out
                    out = []
            pos += 1
        if out:
            yield out
