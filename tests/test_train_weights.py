"""Checkpoint features beyond resume: permanent checkpoints, asynchronous saves, starting from another run's
weights (`checkpoint.init_from`), and export to / import from safetensors."""
import json
import os

import pytest
import torch

from _train_helpers import RUN_SMALL
from model.checkpoint import load_model
from train.builder import build_model
from train.config import ConfigError, load_config
from train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(run_dir, *extra):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), RUN_SMALL + [f"run_dir={run_dir}"] + list(extra))


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def saved_steps(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return sorted(int(n.split("_")[1]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained for 3 steps (its checkpoint is the source of the weights below)."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    run(config(run_dir, "train.steps=3", "checkpoint.every=0"))
    return run_dir


def test_keep_every_checkpoints_are_never_pruned(tmp_path):
    run(config(tmp_path, "train.steps=7", "checkpoint.every=1", "checkpoint.keep=1", "checkpoint.keep_every=3"))
    assert saved_steps(tmp_path) == [3, 6, 7]


def test_async_save_checkpoints_hold_the_state_of_their_step(tmp_path):
    run(config(tmp_path, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.async_save=true"))
    assert saved_steps(tmp_path) == [2, 4, 6]
    ref = losses(tmp_path)
    for step in (4, 6):  # resume from step 2's checkpoint, written while steps 3.. trained
        os.rename(tmp_path / "checkpoints" / f"step_{step}", tmp_path / f"old_{step}")
    run(config(tmp_path, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.async_save=true"))
    resumed = losses(tmp_path)
    assert [resumed[s] for s in (3, 4, 5, 6)] == [ref[s] for s in (3, 4, 5, 6)]


def test_load_model_weights_from_checkpoint_and_export(trained, tmp_path):
    from train.export import main as export_main
    from train.weights import load_model_weights

    source, _ = load_model(str(trained))
    expected = source.state_dict()
    cfg = config(tmp_path / "new")
    model = build_model(cfg, rt=type("RT", (), {"device": torch.device("cpu")})())
    assert load_model_weights(str(trained), model) == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())

    assert export_main([f"checkpoint={trained}", f"out={tmp_path / 'exported'}"]) == 0
    assert sorted(os.listdir(tmp_path / "exported")) == ["config.json", "config.yaml", "model.safetensors",
                                                         "tokenizer.model"]
    exported, _ = load_model(str(tmp_path / "exported"))  # what eval loads
    assert exported.state_dict().keys() == expected.keys()
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in expected.items())


def test_init_from_starts_a_fresh_run_from_the_weights(trained, tmp_path, capsys):
    from train.export import main as export_main

    run(config(tmp_path / "fresh", "train.steps=1", "checkpoint.every=0"))
    run(config(tmp_path / "warm", "train.steps=2", "checkpoint.every=0", f"checkpoint.init_from={trained}"))
    warm = losses(tmp_path / "warm")
    assert warm[1] < losses(tmp_path / "fresh")[1] - 0.05  # trained weights, same first batch
    with open(tmp_path / "warm" / "checkpoints" / "step_2" / "meta.json") as f:
        assert json.load(f)["scheduler"]["last_epoch"] == 2  # a fresh schedule

    export_main([f"checkpoint={trained}", f"out={tmp_path / 'exported'}"])
    run(config(tmp_path / "imported", "train.steps=2", "checkpoint.every=0",
               f"checkpoint.init_from={tmp_path / 'exported'}"))
    assert losses(tmp_path / "imported") == warm

    # the run's own checkpoint wins over init_from from then on
    capsys.readouterr()
    run(config(tmp_path / "warm", "train.steps=3", "checkpoint.every=0", f"checkpoint.init_from={trained}"))
    out = capsys.readouterr().out
    assert "resumed from" in out and "initialised the model weights" not in out, out


def test_init_from_another_architecture_lists_the_keys(trained, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from: .*model\.dim \(64 -> 96\)"):
        run(config(tmp_path, "train.steps=1", "model.dim=96", f"checkpoint.init_from={trained}"))


def test_export_usage_errors(capsys):
    from train.export import main as export_main

    assert export_main(["checkpoint=x"]) == 2
    assert "out: required" in capsys.readouterr().err
    assert export_main(["--help"]) == 0


@pytest.mark.slow
def test_async_save_on_two_ranks_then_fallback_and_resume_on_one(tmp_path):
    # two gloo ranks (FSDP + memory-parallel 2) save asynchronously on their own process group; rank 1's shard of
    # the newest checkpoint is lost; one process falls back to the previous checkpoint and continues
    import subprocess
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "train",
            f"config={ROOT}/configs/tiny.yaml", *RUN_SMALL, f"run_dir={tmp_path}", "train.steps=4",
            "checkpoint.every=2", "checkpoint.async_save=true", "dist.memory_parallel=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert saved_steps(tmp_path) == [2, 4]
    os.remove(tmp_path / "checkpoints" / "step_4" / "__1_0.distcp")
    run(config(tmp_path, "train.steps=5", "checkpoint.every=0"))
    with open(tmp_path / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    resumed = [r for r in recs if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from"].endswith("step_2") and resumed[0]["world_size"] == 1
    tokens = {r["step"]: r["tokens"] for r in recs if "tokens" in r}
    assert tokens[5] == tokens[2] + 3 * 4 * 32  # 2 ranks' tokens until step 2, then one rank's
