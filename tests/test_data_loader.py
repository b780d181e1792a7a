import json

import pytest
import torch

from data import DataConfig, SourceConfig, build_loader, load_tokenizer, unigram_entropy
from _data_helpers import config, docs, take, write_jsonl


def _corpus(tmp_path, n_files=3, n_docs=40):
    return [write_jsonl(tmp_path / f"f{i}.jsonl", docs(n_docs, prefix=f"f{i}")) for i in range(n_files)]


def test_packing_bos_eos_and_shapes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["ab", "cde"])
    tok = load_tokenizer("byte")
    (batch,) = list(build_loader(config([path], seq_len=3), tok, split="val", batch_size=4))
    b, e = tok.bos_id, tok.eos_id
    assert batch.dtype == torch.int64 and batch.tolist() == [[b, 97, 98, e], [b, 99, 100, 101]]  # tail EOS dropped


def test_deterministic_under_seed_and_seed_matters(tmp_path):
    files = _corpus(tmp_path)
    tok = load_tokenizer("byte")
    a = take(build_loader(config(files, seed=1), tok, batch_size=3), 60)
    b = take(build_loader(config(files, seed=1), tok, batch_size=3), 60)
    c = take(build_loader(config(files, seed=2), tok, batch_size=3), 60)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # file order per epoch follows the seed


def test_resume_equality_state_is_json(tmp_path):
    files = _corpus(tmp_path, n_docs=12)
    tok = load_tokenizer("byte")
    cfg = config(files, seq_len=13)
    full = take(build_loader(cfg, tok, batch_size=3), 50)  # 2100 tokens: over 2 epochs of this corpus
    for k in (7, 23):
        first = build_loader(cfg, tok, batch_size=3)
        assert all(torch.equal(x, y) for x, y in zip(take(first, k), full))
        state = json.loads(json.dumps(first.state_dict()))
        fresh = build_loader(cfg, tok, batch_size=3)
        fresh.load_state_dict(state)
        rest = take(fresh, 50 - k)
        assert all(torch.equal(x, y) for x, y in zip(rest, full[k:])), k
        assert fresh.stats()["batches"] == 50 and fresh.stats()["epoch"] >= 2
    # iterating the same train loader again continues where it stopped
    again = build_loader(cfg, tok, batch_size=3)
    take(again, 5)
    assert all(torch.equal(x, y) for x, y in zip(take(again, 5), full[5:10]))


def test_val_is_one_finite_deterministic_pass(tmp_path):
    files = _corpus(tmp_path, n_files=2, n_docs=10)
    tok = load_tokenizer("byte")
    loader = build_loader(config(files, seq_len=8), tok, split="val", batch_size=4)
    a, b = list(loader), list(loader)
    assert len(a) == len(b) > 1 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert loader.stats()["documents"] == 20


def test_unigram_entropy_matches_counts(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["aab", "b"])  # tokens: B a a b E B b E
    h = unigram_entropy(config([path]), load_tokenizer("byte"), split="val")
    import math
    counts = {"B": 2, "a": 2, "b": 2, "E": 2}
    p = [c / 8 for c in counts.values()]
    assert abs(h - -sum(x * math.log(x) for x in p)) < 1e-9


def test_bundled_corpus_entropy_is_plausible():
    cfg = DataConfig(pin_memory=False)
    h = unigram_entropy(cfg, load_tokenizer(cfg.tokenizer), split="val")
    assert 5.0 < h < 8.3  # well below log(4096) = 8.32, well above a degenerate distribution


def _mixture_cfg(tmp_path, **kw):
    a = write_jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"b{i}" for i in range(30)])
    return DataConfig(train=[SourceConfig(paths=[a], weight=3.0), SourceConfig(paths=[b], weight=1.0)],
                      val=[SourceConfig(paths=[a])], tokenizer="byte", seq_len=15, pin_memory=False, **kw)


def _first_chars(batches, tok):
    ids = torch.cat([b.flatten() for b in batches]).tolist()
    return [chr(ids[i + 1]) for i in range(len(ids) - 1) if ids[i] == tok.bos_id]


def test_mixture_proportions_follow_weights(tmp_path):
    tok = load_tokenizer("byte")
    cfg = _mixture_cfg(tmp_path)
    chars = _first_chars(take(build_loader(cfg, tok, batch_size=8), 200), tok)  # ~4000 documents
    share = chars.count("a") / len(chars)
    assert len(chars) > 3000 and abs(share - 0.75) < 0.03, share
    cfg.seed = 5
    other = _first_chars(take(build_loader(cfg, tok, batch_size=8), 20), tok)
    assert other != chars[: len(other)]  # the per-document draws follow the seed


def test_workers_give_the_same_batches_and_resume(tmp_path):
    tok = load_tokenizer("byte")
    cfg = _mixture_cfg(tmp_path, chunk_docs=4)
    ref = take(build_loader(cfg, tok, batch_size=4), 40)
    cfg.num_workers, cfg.prefetch = 2, 2
    loader = build_loader(cfg, tok, batch_size=4)
    head = take(loader, 13)  # workers have prefetched past this point; the state must not include that
    fresh = build_loader(cfg, tok, batch_size=4)
    fresh.load_state_dict(loader.state_dict())
    got = head + take(fresh, 27)
    assert all(torch.equal(x, y) for x, y in zip(got, ref)) and len(got) == 40


def test_finished_finite_loader_stays_finished(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", docs(10), extra_lines=["{bad"])
    cfg = config([path], seq_len=7, epochs=1)
    loader = build_loader(cfg, load_tokenizer("byte"), batch_size=2)
    assert len(list(loader)) > 3 and list(loader) == []
    assert loader.stats()["skipped_bad_json"] == 1 and loader.stats()["documents"] == 10


@pytest.mark.gpu
def test_batches_are_pinned_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    files = _corpus(tmp_path, n_files=2, n_docs=10)
    tok = load_tokenizer("byte")
    for workers in (0, 2):
        cfg = config(files, num_workers=workers)
        cfg.pin_memory = True
        batch = take(build_loader(cfg, tok, batch_size=2), 1)[0]
        assert batch.is_pinned()
        assert torch.equal(batch.cuda(non_blocking=True).cpu(), batch)
