"""scripts/capture_slots.py: the rows each memory layer read in a training step, saved for kernel benchmarks."""
import os
import sys

import torch

from model.memory import SlotUsage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts import capture_slots  # noqa: E402


def test_slot_usage_keeps_the_latest_forward_only_when_asked():
    usage = SlotUsage(16)
    first, second = torch.tensor([[[1, 2], [3, 4]]]), torch.tensor([[[5, 5], [6, 7]]])  # [tokens, heads, knn]
    usage.add(first)
    assert usage.last is None
    usage.keep_last = True
    usage.add(first)
    usage.add(second)
    assert torch.equal(usage.last, second.reshape(1, 4))
    assert usage.read()["reads"] == 12  # counting goes on beside it


def test_capture_saves_every_memory_layers_slots(tmp_path, monkeypatch, capsys):
    out = tmp_path / "slots.pt"
    argv = ["capture_slots.py", f"config={ROOT}/configs/tiny.yaml", "model.memory.layers=[1,3]", "train.batch_size=2",
            "data.seq_len=32", "train.compile=false", f"run_dir={tmp_path}/run", "--warmup", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    capture_slots.main()
    data = torch.load(out)
    assert data["n_slots"] == 64 ** 2 and data["v_dim"] == 128
    assert sorted(data["slots"]) == [1, 3]
    for slots in data["slots"].values():
        assert slots.dtype == torch.int32 and slots.shape == (2 * 32, 2 * 16)  # tokens x heads * knn
        assert 0 <= int(slots.min()) and int(slots.max()) < 64 ** 2
        assert all(len(set(row[h * 16:(h + 1) * 16].tolist())) == 16 for row in slots for h in range(2))
    printed = capsys.readouterr().out
    assert "layer 1:" in printed and "layer 3:" in printed and "busiest rows" in printed
