"""Every source type yields the same documents through the same loader interface."""
import gzip
import json

import numpy as np
import pytest

from data import DataError

from data import DataConfig, SourceConfig, build_loader, load_tokenizer
from data.pretokenize import pretokenize
from _data_helpers import docs, write_jsonl

TEXTS = docs(12) + ["multi\nline  text\twith 🤖"]


def _decoded_docs(cfg, split="val"):
    tok = load_tokenizer(cfg.tokenizer)
    loader = build_loader(cfg, tok, split=split, batch_size=16)
    ids = np.concatenate([b.flatten().numpy() for b in loader] + [np.zeros(0, dtype=np.int64)])
    out, cur = [], None
    for i in ids:
        if i == tok.bos_id:
            cur = []
        elif i == tok.eos_id:
            out.append(tok.decode(cur))
        else:
            cur.append(int(i))
    if cur and len(ids) and ids[-1] != tok.eos_id:  # rows of 2 tokens: at most the final EOS falls off the last row
        out.append(tok.decode(cur))
    return out, loader.stats()


def _cfg(src, **kw):
    return DataConfig(train=[src], val=[src], tokenizer="byte", seq_len=1, pin_memory=False, **kw)


def test_jsonl_plain_gz_zst(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    raw = "".join(json.dumps({"body": t}) + "\n" for t in TEXTS).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "c.jsonl").write_bytes(raw)
    got, stats = _decoded_docs(_cfg(SourceConfig(paths=[str(tmp_path)], text_field="body")))
    assert got == TEXTS * 3 and stats["documents"] == 39


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": TEXTS + [None, "", "x"], "n": list(range(len(TEXTS) + 3))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=4)
    got, stats = _decoded_docs(_cfg(SourceConfig(paths=[str(tmp_path / "*.parquet")], text_field="content")))
    assert got == TEXTS + ["x"] and stats["skipped_missing_text"] == 1 and stats["skipped_empty_text"] == 1
    # resume inside a row group goes through the (offset -> row group) seek path
    cfg = _cfg(SourceConfig(paths=[str(tmp_path / "d.parquet")], text_field="content"), epochs=1)
    full = list(build_loader(cfg, load_tokenizer("byte"), batch_size=2))
    first = build_loader(cfg, load_tokenizer("byte"), batch_size=2)
    it = iter(first)
    head = [next(it) for _ in range(9)]
    rest = build_loader(cfg, load_tokenizer("byte"), batch_size=2)
    rest.load_state_dict(first.state_dict())
    resumed = head + list(rest)
    assert len(resumed) == len(full) and all((a == b).all() for a, b in zip(resumed, full))
    # a file without the column is an unreadable file, counted; alone, the source has nothing usable: an error
    pq.write_table(pa.table({"other": ["a"]}), tmp_path / "e.parquet")
    both = [str(tmp_path / "d.parquet"), str(tmp_path / "e.parquet")]
    got, stats = _decoded_docs(_cfg(SourceConfig(paths=both, text_field="content")))
    assert stats["skipped_unreadable"] == 1 and got == TEXTS + ["x"]
    with pytest.raises(DataError, match=r"no usable document in .*e\.parquet.*unreadable.*no column 'content'"):
        _decoded_docs(_cfg(SourceConfig(paths=[str(tmp_path / "e.parquet")], text_field="content")))


@pytest.mark.parametrize("split,expected", [
    ("paragraph", ["p1 a\np1 b", "p2", "p3\n  indented"]),
    ("line", ["p1 a", "p1 b", "p2", "p3", "  indented"]),
    ("file", ["p1 a\np1 b\n\n\np2\n\np3\n  indented\n"]),
])
def test_plain_text(tmp_path, split, expected):
    (tmp_path / "t.txt").write_text("p1 a\np1 b\n\n\np2\n\np3\n  indented\n")
    got, _ = _decoded_docs(_cfg(SourceConfig(paths=[str(tmp_path / "t.txt")], text_split=split)))
    assert got == expected


def test_hf_datasets_streaming_local_files(tmp_path):
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "h.jsonl", TEXTS)
    src = SourceConfig(paths=[path], type="hf")
    got, _ = _decoded_docs(_cfg(src))
    assert got == TEXTS
    cfg = _cfg(src, epochs=1)  # resume skips records of the stream
    tok = load_tokenizer("byte")
    full = list(build_loader(cfg, tok, batch_size=2))
    first = build_loader(cfg, tok, batch_size=2)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    rest = build_loader(cfg, tok, batch_size=2)
    rest.load_state_dict(first.state_dict())
    resumed = head + list(rest)
    assert len(resumed) == len(full) and all((a == b).all() for a, b in zip(resumed, full))


def test_memmap_shards_match_text_source(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", TEXTS, extra_lines=["{bad"])
    index = pretokenize([path], "byte", str(tmp_path / "mm"), shard_tokens=60, workers=1)
    assert len(index["shards"]) > 2 and index["skipped"] == {"bad_json": 1}
    got, _ = _decoded_docs(_cfg(SourceConfig(paths=[str(tmp_path / "mm")])))
    assert got == TEXTS
    tok = load_tokenizer("byte")
    a = list(build_loader(_cfg(SourceConfig(paths=[path]), epochs=2, shuffle_files=False), tok, batch_size=3))
    b = list(build_loader(_cfg(SourceConfig(paths=[str(tmp_path / "mm")]), epochs=2, shuffle_files=False), tok,
                          batch_size=3))
    assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b))


def test_pretokenize_cli_with_shuffle(tmp_path):
    from data.pretokenize import main

    path = write_jsonl(tmp_path / "m.jsonl", TEXTS)
    main(["--input", path, "--tokenizer", "byte", "--output", str(tmp_path / "mm"), "--shuffle-seed", "3",
          "--workers", "2"])
    got, _ = _decoded_docs(_cfg(SourceConfig(paths=[str(tmp_path / "mm")])))
    assert sorted(got) == sorted(TEXTS) and got != TEXTS


def test_memmap_rejects_other_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", TEXTS)
    pretokenize([path], "byte", str(tmp_path / "mm"))
    tok = load_tokenizer("data/corpus/tokenizer.model")
    cfg = _cfg(SourceConfig(paths=[str(tmp_path / "mm")]))
    with pytest.raises(ValueError, match="pretokenized with tokenizer byte"):
        build_loader(cfg, tok)
