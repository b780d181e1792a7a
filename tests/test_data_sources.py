import json
import logging

import pytest

from data import DataConfig, DataError, SourceConfig, build_loader, load_tokenizer
from _data_helpers import config, docs, write_jsonl

BAD_LINES = ['{"text": "ok 1"}', "{not json", '{"title": "no text"}', '{"text": ""}', '{"text": "   "}',
             '{"text": 42}', '{"text": null}', "[1, 2]", "", '{"text": "ok 2"}']


def _all_text(loader, tok):
    return "".join(tok.decode(b.flatten().tolist()) for b in loader)


def test_malformed_lines_skipped_counted_and_warned(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    tok = load_tokenizer("byte")
    loader = build_loader(config([str(path)], seq_len=4), tok, split="val", batch_size=1)
    with caplog.at_level(logging.WARNING, logger="data"):
        text = _all_text(loader, tok)
    s = loader.stats()
    assert s["documents"] == 2 and "ok 1" in text
    assert (s["skipped_bad_json"], s["skipped_missing_text"], s["skipped_empty_text"], s["skipped_non_string_text"]) \
        == (2, 2, 2, 1)
    assert f"{path}:2" in caplog.text and f"{path}:3" in caplog.text  # file:line in the first warnings


def test_strict_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{oops\n')
    cfg = config([str(path)], seq_len=4, strict=True)
    with pytest.raises(DataError, match=rf"{path}:3: bad_json"):
        list(build_loader(cfg, load_tokenizer("byte"), split="val", batch_size=1))


def test_invalid_utf8_and_truncated_gzip(tmp_path):
    import gzip

    bad = tmp_path / "a.jsonl"
    bad.write_bytes(b'{"text": "good"}\n{"text": "\xff\xfe bad"}\n')
    raw = "".join(json.dumps({"text": f"gz doc {i}"}) + "\n" for i in range(2000)).encode()
    trunc = tmp_path / "b.jsonl.gz"
    trunc.write_bytes(gzip.compress(raw)[:-200])
    tok = load_tokenizer("byte")
    loader = build_loader(config([str(bad), str(trunc)], seq_len=4), tok, split="val", batch_size=4)
    _all_text(loader, tok)
    s = loader.stats()
    assert s["skipped_bad_utf8"] == 1 and s["skipped_unreadable"] == 1
    assert 1000 < s["documents"] < 2001  # what came before the truncation is kept


def test_unreadable_file_strict_and_lenient(tmp_path):
    d = tmp_path / "dir.jsonl"
    d.mkdir()  # a "file" that cannot be opened as one
    good = write_jsonl(tmp_path / "good.jsonl", ["x y z"])
    tok = load_tokenizer("byte")
    with pytest.raises(FileNotFoundError, match="dir.jsonl"):  # a directory with no data files matches nothing
        build_loader(config([str(d), good], seq_len=2), tok, split="val", batch_size=1)
    gz = tmp_path / "notgz.jsonl.gz"
    gz.write_bytes(b"this is not gzip data\n")
    loader = build_loader(config([str(gz), good], seq_len=2), tok, split="val", batch_size=1)
    list(loader)
    assert loader.stats()["skipped_unreadable"] == 1 and loader.stats()["documents"] == 1
    with pytest.raises(DataError, match="notgz.jsonl.gz"):
        list(build_loader(config([str(gz), good], seq_len=2, strict=True), tok, split="val", batch_size=1))


def test_nonexistent_path_or_glob_is_named(tmp_path):
    tok = load_tokenizer("byte")
    with pytest.raises(FileNotFoundError, match=r"data.train\[0\].*nothing-\*.jsonl"):
        build_loader(config([str(tmp_path / "nothing-*.jsonl")]), tok)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_loader(config([str(tmp_path / "missing.jsonl")]), tok)


def test_glob_and_directory_sources(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"part{i}.jsonl", docs(5, prefix=f"p{i}"))
    (tmp_path / "notes.bin").write_bytes(b"\x00")  # unknown extension inside a directory: ignored
    tok = load_tokenizer("byte")
    for spec in (str(tmp_path / "part*.jsonl"), str(tmp_path)):
        loader = build_loader(config([spec], seq_len=8), tok, split="val", batch_size=2)
        _all_text(loader, tok)
        assert loader.stats()["documents"] == 15


def test_config_validation_names_keys():
    with pytest.raises(ValueError, match=r"data.seq_len"):
        DataConfig(seq_len=0).validate("data")
    with pytest.raises(ValueError, match=r"data.train\[0\].weight"):
        DataConfig(train=[SourceConfig(paths=["x"], weight=0)]).validate("data")
    with pytest.raises(ValueError, match=r"data.val\[0\].type: unknown source type 'csvx'"):
        DataConfig(val=[SourceConfig(paths=["x"], type="csvx")]).validate("data")
    with pytest.raises(ValueError, match=r"data.train: no sources"):
        DataConfig(train=[]).validate("data")
    DataConfig().validate("data")


def test_default_config_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(pin_memory=False)
    tok = load_tokenizer(cfg.tokenizer)
    batch = next(iter(build_loader(cfg, tok, split="val", batch_size=2)))
    assert batch.shape == (2, cfg.seq_len + 1) and batch[0, 0] == tok.bos_id
