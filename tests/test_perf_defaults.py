"""Defaults chosen for speed: automatic data workers, data wait in the metrics, eager evaluation of compiled models."""
import json
import os

import pytest
import torch

from _train_helpers import RUN_SMALL
from data import DataConfig
from data.loader import auto_num_workers
from train.config import load_config
from train.loop import run
from train.parallelize import eager_for_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def test_auto_workers_none_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DataConfig().num_workers is None  # the default is automatic
    assert auto_num_workers(None) == 0  # CPU runs stay single-process (CI)
    assert auto_num_workers(3) == 3  # an explicit value is kept


def test_auto_workers_on_gpu_machines(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto_num_workers(None) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 2 cores per GPU process
    assert auto_num_workers(None) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert auto_num_workers(None) == 0
    assert auto_num_workers(0) == 0


def test_data_config_rejects_bad_workers():
    with pytest.raises(ValueError, match="num_workers"):
        DataConfig(num_workers=-1).validate()
    DataConfig(num_workers=None).validate()


def test_metrics_report_data_wait(tmp_path):
    run(load_config(TINY, RUN_SMALL + [f"run_dir={tmp_path / 'r'}", "train.steps=3"]))
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f if '"loss"' in line]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["data_wait_ms"] > 0 and 0 < r["data_wait_frac"] < 1


def test_eager_for_eval_runs_compiled_code_eagerly():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda x: x * 2 + 1)
    cfg = load_config(TINY, RUN_SMALL + ["train.compile=true"])
    with eager_for_eval(cfg):
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    assert not counters["stats"]["unique_graphs"]  # nothing was compiled inside
    off = load_config(TINY, RUN_SMALL + ["train.compile=false"])
    with eager_for_eval(off):
        pass
