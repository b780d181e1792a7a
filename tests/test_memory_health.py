"""Memory health: slot-read counts of memory layers, their window statistics, and their metrics.jsonl keys."""
import json
import math
import os

import pytest
import torch

from _train_helpers import RUN_SMALL
from model import MemoryConfig, ModelConfig, Transformer
from model.memory import SlotUsage
from train.config import load_config
from train.loop import run
from train.memory_health import memory_health_metrics, track_memory_usage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_window_statistics_by_hand():
    usage = SlotUsage(16)
    assert usage.read() == {}
    usage.add(torch.tensor([[0, 0], [1, 2]]))  # reads: row 0 twice, rows 1 and 2 once
    s = usage.read()
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.5 bits
    assert s == pytest.approx({"rows_read": 3 / 16, "entropy": h, "entropy_frac": h / math.log(16),
                               "dead": 13 / 16, "reads": 4})
    usage.add(torch.tensor([5, 5, 5]))  # new window: one row
    assert usage.read() == pytest.approx({"rows_read": 1 / 16, "entropy": 0.0, "entropy_frac": 0.0,
                                          "dead": 12 / 16, "reads": 3})
    assert usage.read()["rows_read"] == 0.0 and usage.read()["dead"] == 12 / 16  # empty window


def small_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, multiple_of=16, memory=MemoryConfig(
        layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=8, backend="reference")))


def test_training_forwards_count_every_read_per_layer():
    model = small_model()
    keys_before = set(model.state_dict())
    usage = track_memory_usage(model)
    assert sorted(usage) == [0, 2]
    tokens = torch.randint(0, 64, (3, 5))
    model.eval()
    model(tokens)
    assert memory_health_metrics(usage) == {}  # eval forwards are not counted
    model.train()
    model(tokens)
    model(tokens)
    for layer in (0, 2):
        counts = usage[layer].counts.clone()
        assert int(counts.sum()) == 2 * 15 * 2 * 4  # forwards x tokens x heads x knn
        assert usage[layer].read()["rows_read"] == pytest.approx(float((counts > 0).double().mean()))
    assert set(model.state_dict()) == keys_before  # counters are not checkpoint state
    m = memory_health_metrics(usage)
    assert m["memory/0/rows_read"] == 0.0  # read() above opened a new, empty window


def test_counts_match_the_search():
    model = small_model()
    usage = track_memory_usage(model)
    tokens = torch.randint(0, 64, (2, 6))
    layer = model.layers[0]
    h = model.tok_embeddings(tokens)
    cos, sin = model.rope(torch.arange(6).expand(2, 6))
    h = h + layer.attention(layer.attention_norm(h), cos, sin, None, None, 0, 0)
    _, slots = layer.memory.search(layer.ffn_norm(h).reshape(-1, 32))
    model(tokens)
    expected = torch.bincount(slots.flatten(), minlength=64)
    assert torch.equal(usage[0].counts, expected)


def test_run_logs_health_per_memory_layer(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      RUN_SMALL + [f"run_dir={tmp_path}", "train.steps=3", "logging.memory_health=true"])
    run(cfg)
    with open(tmp_path / "metrics.jsonl") as f:
        recs = [r for r in map(json.loads, f) if "loss" in r]
    assert len(recs) == 3
    for r in recs:
        for layer in (0, 1):
            assert 0 < r[f"memory/{layer}/rows_read"] <= 1 and 0 < r[f"memory/{layer}/entropy_frac"] <= 1
            assert 0 <= r[f"memory/{layer}/dead"] < 1
    assert recs[2]["memory/0/dead"] <= recs[0]["memory/0/dead"]  # dead rows only come back to life
