"""Sources that can never give a batch stop with an error naming the file, instead of an endless stream that
spins before the first batch (binary junk, only empty documents, a rank that owns only bad records)."""
import json
import os
import subprocess
import sys

import pytest

from _data_helpers import config, take, write_jsonl
from _train_helpers import RUN_SMALL
from data import ByteTokenizer, DataError, build_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _garbage(path, n=4096, seed=0):
    import random

    rng = random.Random(seed)
    # bytes that are never valid UTF-8 (0xFF cannot start a sequence), with newlines: many bad "records"
    data = bytes(rng.choice([0xFF, 0xFE, 0xC3, 0x0A, 0x80]) for _ in range(n))
    path.write_bytes(b"\xff" + data)
    return str(path)


def _empty_docs(path, n=40):
    return write_jsonl(path, [""] * (n // 2) + ["   "] * (n - n // 2))


@pytest.mark.parametrize("kind", ["garbage", "empty"])
def test_unusable_source_is_an_error_naming_the_file(tmp_path, kind):
    bad = _garbage(tmp_path / "junk.jsonl") if kind == "garbage" else _empty_docs(tmp_path / "blank.jsonl")
    reason = "bad_utf8" if kind == "garbage" else "empty_text"
    with pytest.raises(DataError, match=rf"^data\.train\[0\]: no usable document in {bad}: .*{reason}.* "
                                        rf"the first at {bad}:1: {reason}"):
        build_loader(config([bad], val_paths=[write_jsonl(tmp_path / "v.jsonl", ["fine text"])]), ByteTokenizer())


def test_a_good_source_beside_a_bad_file_still_trains(tmp_path):
    bad = _garbage(tmp_path / "junk.jsonl")
    good = write_jsonl(tmp_path / "good.jsonl", [f"document number {i}" for i in range(20)])
    loader = build_loader(config([bad, good], val_paths=[good]), ByteTokenizer(), batch_size=2)
    assert len(take(loader, 3)) == 3
    assert loader.stats()["skipped_bad_utf8"] > 0


_RANK_1_OF_2 = """
import sys
sys.path.insert(0, "tests")
from _data_helpers import config, take
from data import ByteTokenizer, DataError, build_loader
cfg = config([sys.argv[1]])
assert len(take(build_loader(cfg, ByteTokenizer(), rank=0, world_size=2, batch_size=2), 3)) == 3
try:
    take(build_loader(cfg, ByteTokenizer(), rank=1, world_size=2, batch_size=2), 1)
except DataError as e:
    print(e)
"""


@pytest.mark.slow  # a subprocess
def test_a_rank_that_owns_only_bad_records_stops(tmp_path):
    # rank 1 of 2 owns the odd records, which are all empty: it would never fill a batch
    path = tmp_path / "alt.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"hello world {i}" if i % 2 == 0 else ""}) + "\n")
    try:  # a subprocess: without the guard the iteration never ends
        proc = subprocess.run([sys.executable, "-c", _RANK_1_OF_2, str(path)], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("a rank without usable documents did not stop")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"data.train (rank 1 of 2; {path}): no usable document in 2 whole passes")


@pytest.mark.slow  # a trainer subprocess
@pytest.mark.parametrize("kind", ["garbage", "empty"])
def test_training_on_unusable_data_exits_with_one_line(tmp_path, kind):
    bad = _garbage(tmp_path / "junk.jsonl") if kind == "garbage" else _empty_docs(tmp_path / "blank.jsonl")
    cmd = [sys.executable, "-m", "train", f"config={ROOT}/configs/tiny.yaml", *RUN_SMALL, "train.steps=2",
           f"data.train=[{{paths: [{bad}]}}]", f"run_dir={tmp_path}/run"]
    try:  # it used to spin forever before step 1: a timeout fails the test
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("training on unusable data did not stop")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: data.train[0]: no usable document in {bad}")
    assert not (tmp_path / "run" / "checkpoints").exists()
