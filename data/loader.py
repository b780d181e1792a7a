"""build_loader: batches [B, seq_len + 1] from a split's sources, with exact, JSON-able resume state.

Train loaders are endless (or data.epochs passes) and each `for batch in loader` continues where the last
delivered batch left off; val loaders make one deterministic pass, from the start, every time they are
iterated. A finite pass ends with a smaller batch holding the remaining full rows.
"""
from __future__ import annotations

import copy
import os
from typing import Iterator, List, Optional, Union

import torch

from data.config import DataConfig, resolve_path
from data.batching import batches
from data.prefetch import threaded
from data.resize import merge_states, merge_stats
from data.sources import BAD_REASONS, SourceSpec, check_usable, files_text
from data.stream import DocStream, initial_state

STATE_VERSION = 1


def zero_stats() -> dict:
    return {"batches": 0, "documents": 0, "tokens": 0, "epoch": 0, **{f"skipped_{r}": 0 for r in BAD_REASONS}}


def _identity(x):
    return x


class _Chunks(torch.utils.data.IterableDataset):
    def __init__(self, stream: DocStream):
        self.stream = stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return self.stream.iter_chunks(info.id, info.num_workers) if info else self.stream.iter_chunks()


def auto_num_workers(requested: Optional[int]) -> int:
    """data.num_workers, with null resolved: no workers without a GPU (CPU runs stay single-process and CPU cores
    go to the model), else up to 4 per GPU process from its share of the cores. Batches are the same for any
    number of workers, so the choice changes speed only."""
    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    per_rank = (os.cpu_count() or 1) // local
    return max(0, min(4, per_rank // 2))


class Loader:
    def __init__(self, cfg: DataConfig, tokenizer, split: str, rank: int, world_size: int, batch_size: int):
        if split not in ("train", "val"):
            raise ValueError(f"split: {split!r} is not 'train' or 'val'")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        cfg.validate("data")
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.num_workers = auto_num_workers(cfg.num_workers)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.specs: List[SourceSpec] = [SourceSpec.from_config(s, f"data.{split}[{i}]", resolve_path)
                                        for i, s in enumerate(getattr(cfg, split))]
        _check_memmap_tokenizer(self.specs, tokenizer)
        for spec in self.specs:
            check_usable(spec)
        self._stream_state = initial_state(len(self.specs), world_size)
        self._stats = zero_stats()
        self._generation = 0

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return copy.deepcopy({"version": STATE_VERSION, "split": self.split, "rank": self.rank,
                              "stream": self._stream_state, "stats": self._stats})

    def load_state_dict(self, state: Union[dict, List[dict]]) -> None:
        """One rank's own state (same world size), or the list of every rank's state (any world size)."""
        states = state if isinstance(state, list) else [state]
        for s in states:
            if s.get("version") != STATE_VERSION or s.get("split") != self.split:
                raise ValueError(f"loader state: version/split {s.get('version')}/{s.get('split')} does not match "
                                 f"{STATE_VERSION}/{self.split}")
            if len(s["stream"]["cursors"]) != len(self.specs):
                raise ValueError(f"loader state: {len(s['stream']['cursors'])} sources, config has {len(self.specs)}")
        old_world = states[0]["stream"]["world_size"]
        if old_world == self.world_size:
            mine = [s for s in states if s["rank"] == self.rank]
            if not mine:
                got = [s["rank"] for s in states]
                raise ValueError(f"loader state: no state for rank {self.rank} (got ranks {got})")
            self._stream_state, self._stats = copy.deepcopy(mine[0]["stream"]), copy.deepcopy(mine[0]["stats"])
        else:
            if len(states) != old_world:
                raise ValueError(f"loader state: resuming {old_world} ranks on {self.world_size} needs the list of all "
                                 f"{old_world} rank states, got {len(states)}")
            self._stream_state = merge_states(states, self.world_size)
            # counters are per rank (sum them over ranks for totals): the old totals go to the new rank 0
            self._stats = merge_stats(states) if self.rank == 0 else zero_stats()

    def stats(self) -> dict:
        return dict(self._stats)

    # -- iteration -----------------------------------------------------------------------------------
    def _chunks(self, stream: DocStream) -> Iterator[list]:
        if self.num_workers == 0:
            return stream.iter_chunks()
        dl = torch.utils.data.DataLoader(_Chunks(stream), batch_size=None, collate_fn=_identity,
                                         num_workers=self.num_workers, prefetch_factor=self.cfg.prefetch)
        return iter(dl)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._generation += 1
        gen, train = self._generation, self.split == "train"
        state = self._stream_state if train else initial_state(len(self.specs), self.world_size)
        stats = dict(self._stats) if train else zero_stats()
        if not train:
            self._stats = dict(stats)
        stream = DocStream(self.specs, train, self.cfg.seed, self.cfg.shuffle_files, self.cfg.strict,
                           self.tokenizer, self.cfg.max_warnings, self.rank, state, self.cfg.chunk_docs,
                           self.cfg.epochs)
        pin = self.cfg.pin_memory and torch.cuda.is_available()
        files = "; ".join(files_text(spec) for spec in self.specs)
        label = f"data.{self.split} (rank {self.rank} of {self.world_size}; {files})"
        out = batches(self._chunks(stream), self.batch_size, self.cfg.seq_len + 1, state, stats, train, pin, label)
        if self.num_workers > 0:  # workers tokenize; a thread packs and pins, off the training thread
            out = threaded(out, depth=2)
        for batch, new_state, new_stats in out:
            if gen == self._generation:  # an abandoned iterator must not move the loader's position
                self._stream_state, self._stats = new_state, new_stats
            if batch is not None:
                yield batch


def _check_memmap_tokenizer(specs: List[SourceSpec], tokenizer) -> None:
    for spec in specs:
        for path, meta in spec.memmap_meta.items():
            fp, vocab = getattr(tokenizer, "fingerprint", lambda: None)(), tokenizer.vocab_size
            if meta.get("tokenizer") != fp or meta.get("vocab_size") != vocab:
                raise ValueError(f"{spec.name}: {path} was pretokenized with tokenizer {meta.get('tokenizer')} "
                                 f"(vocab {meta.get('vocab_size')}), the loader's is {fp} (vocab {vocab})")


def all_rank_states(loader: Loader, group=None) -> List[dict]:
    """Every data-parallel rank's loader state, for a checkpoint that may resume on another world size.

    A collective when torch.distributed is initialized: call it on every rank of `group` (default: world).
    Ranks that share a data-parallel rank (tensor/pipeline parallel) hold the same state; one is kept.
    """
    import torch.distributed as dist

    if loader.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [loader.state_dict()]
    states: List[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(states, loader.state_dict(), group=group)
    return sorted({s["rank"]: s for s in states}.values(), key=lambda s: s["rank"])


def skipped_totals(states: List[dict]) -> dict:
    """Bad records skipped, summed over the rank states of `all_rank_states`: {"skipped": total,
    "skipped_<reason>": n} (reasons with n > 0 only)."""
    out = {"skipped": 0}
    for reason in BAD_REASONS:
        n = sum(int(s["stats"].get(f"skipped_{reason}", 0)) for s in states)
        if n:
            out[f"skipped_{reason}"] = n
            out["skipped"] += n
    return out


def build_loader(cfg: DataConfig, tokenizer, split: str = "train", rank: int = 0, world_size: int = 1,
                 batch_size: int = 8) -> Loader:
    return Loader(cfg, tokenizer, split, rank, world_size, batch_size)
