"""No document dropped or duplicated across ranks, epochs and world-size changes.

The tokenizer here gives every token of the corpus a unique id (doc * 1000 + index), so counting ids over
all ranks' batches shows exactly which document tokens were delivered and how often.
"""
import collections
import json

import numpy as np
import pytest

from data import DataConfig, SourceConfig, build_loader
from _data_helpers import write_jsonl


class IdTokenizer:
    """'<doc>:<n>' -> n ids unique to that document."""

    bos_id, eos_id, pad_id, vocab_size = 0, 1, 2, 10 ** 7

    def encode(self, text):
        doc, n = map(int, text.split(":"))
        return [3 + doc * 1000 + j for j in range(n)]

    def fingerprint(self):
        return "id"


TOK = IdTokenizer()


def _corpus(tmp_path, n_files, n_docs):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, size=n_docs)  # uneven lengths: ranks consume documents at different rates
    per = np.array_split(np.arange(n_docs), n_files)
    files = [write_jsonl(tmp_path / f"f{i:03d}.jsonl", [f"{d}:{sizes[d]}" for d in ids]) for i, ids in enumerate(per)]
    expected = collections.Counter(3 + d * 1000 + j for d in range(n_docs) for j in range(sizes[d]))
    return files, expected


def _cfg(files, **kw):
    return DataConfig(train=[SourceConfig(paths=files)], val=[SourceConfig(paths=files)], tokenizer="byte",
                      seq_len=5, pin_memory=False, **kw)


def _count(batches, counter):
    for b in batches:
        ids = b.flatten().numpy()
        counter.update(int(i) for i in ids[ids > 2])


def _check(got, expected, epochs, tail_tokens):
    """Every document token delivered `epochs` times, except at most `tail_tokens` from the final partial rows."""
    over = {k: v for k, v in got.items() if v > epochs or k not in expected}
    assert not over, f"duplicated/unknown tokens: {list(over.items())[:5]}"
    missing = sum(epochs * v - got.get(k, 0) for k, v in expected.items())
    assert 0 <= missing <= tail_tokens


@pytest.mark.parametrize("n_files,world", [(1, 8), (7, 3), (2, 5), (30, 4), (1000, 3)])
def test_ranks_partition_the_corpus_each_epoch(tmp_path, n_files, world):
    files, expected = _corpus(tmp_path, n_files, n_docs=60)
    for split, epochs in (("val", 1), ("train", 2)):
        got = collections.Counter()
        for rank in range(world):
            loader = build_loader(_cfg(files, epochs=epochs), TOK, split=split, rank=rank, world_size=world,
                                  batch_size=2)
            _count(loader, got)
        _check(got, expected, epochs, tail_tokens=world * 6)


@pytest.mark.parametrize("old,new,steps", [(3, 2, 4), (2, 5, 7), (4, 4, 3), (1, 3, 10)])
def test_resume_on_a_different_world_size(tmp_path, old, new, steps):
    files, expected = _corpus(tmp_path, 5, n_docs=50)
    cfg = _cfg(files, epochs=2)
    got, states = collections.Counter(), []
    for rank in range(old):
        loader = build_loader(cfg, TOK, rank=rank, world_size=old, batch_size=2)
        it = iter(loader)
        _count([next(it) for _ in range(steps)], got)
        states.append(json.loads(json.dumps(loader.state_dict())))
    # a second change of world size on top of the first
    states2 = []
    for rank in range(new):
        loader = build_loader(cfg, TOK, rank=rank, world_size=new, batch_size=2)
        loader.load_state_dict(states)
        it = iter(loader)
        _count([b for _, b in zip(range(steps), it)], got)
        states2.append(loader.state_dict())
    for rank in range(old):
        loader = build_loader(cfg, TOK, rank=rank, world_size=old, batch_size=2)
        loader.load_state_dict(states2)
        _count(loader, got)
    _check(got, expected, 2, tail_tokens=old * 6)


def test_same_world_size_resume_needs_own_state(tmp_path):
    files, _ = _corpus(tmp_path, 2, n_docs=10)
    a = build_loader(_cfg(files), TOK, rank=0, world_size=2, batch_size=2)
    b = build_loader(_cfg(files), TOK, rank=1, world_size=2, batch_size=2)
    with pytest.raises(ValueError, match="no state for rank 1"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="needs the list of all 2 rank states"):
        build_loader(_cfg(files), TOK, rank=0, world_size=3, batch_size=2).load_state_dict([a.state_dict()])


def _gather_worker(rank, world, files, port, out):
    import torch.distributed as dist

    from data import all_rank_states

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = build_loader(_cfg(files), TOK, rank=rank, world_size=world, batch_size=2)
        it = iter(loader)
        for _ in range(3 + rank):  # uneven on purpose: states differ per rank
            next(it)
        states = all_rank_states(loader)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(states, f)
        dist.barrier()  # let every rank finish before any tears the group down
    finally:
        dist.destroy_process_group()


def test_all_rank_states_gathers_over_torch_distributed(tmp_path):
    import socket

    from _dist_helpers import start_ranks

    files, _ = _corpus(tmp_path, 3, n_docs=30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "states.json")
    start_ranks(_gather_worker, (2, files, port, out), 2)
    states = json.load(open(out))
    assert [s["rank"] for s in states] == [0, 1] and states[0] != states[1]
    single = build_loader(_cfg(files), TOK, rank=0, world_size=1, batch_size=2)
    single.load_state_dict(states)  # 2 ranks -> 1
    assert single.stats()["batches"] == 3 + 4 and next(iter(single)).shape == (2, 6)  # counters summed
