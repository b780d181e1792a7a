"""Nothing bad is saved, nothing good is lost: the non-finite guard, falling back from a damaged checkpoint,
config changes on resume, and the bookkeeping a resume must keep honest (tokens, duplicate records)."""
import json
import os
import shutil

import pytest
import torch

import train.step
from _train_helpers import RUN_SMALL
from train.checkpoint import CheckpointError
from train.config import ConfigError, load_config
from train.loop import run
from train.nonfinite import NonFiniteError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(run_dir, *extra):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), RUN_SMALL + [f"run_dir={run_dir}"] + list(extra))


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def saved_steps(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return sorted(int(n.split("_")[1]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())


def checkpoint_weights(path):
    from model.checkpoint import load_model

    model, _ = load_model(str(path))
    return model.state_dict()


def nan_loss_at(monkeypatch, bad_steps):
    """Make the training loss NaN on the given optimizer steps (one micro-batch per step)."""
    real, calls = train.step.lm_loss, {"n": 0}

    def lm_loss(model, batch, rt):
        calls["n"] += 1
        loss = real(model, batch, rt)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    monkeypatch.setattr(train.step, "lm_loss", lm_loss)


# --- non-finite guard -------------------------------------------------------------------------------------------

def test_nonfinite_stop_never_saves_it_and_keeps_the_good_checkpoints(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, set(range(7, 100)))  # diverged from step 7 on; logged only at 1 and 12
    with pytest.raises(NonFiniteError, match="step 7"):
        run(config(tmp_path, "train.steps=12", "train.log_every=20", "checkpoint.every=2", "checkpoint.keep=2"))
    assert saved_steps(tmp_path) == [4, 6]
    for step in (4, 6):
        weights = checkpoint_weights(tmp_path / "checkpoints" / f"step_{step}")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_skip_drops_those_steps_and_counts_them(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {3, 4})
    run(config(tmp_path, "train.steps=6", "checkpoint.every=0", "train.nonfinite=skip", "train.max_skipped_steps=2"))
    recs = {r["step"]: r for r in records(tmp_path) if "loss" in r}
    assert recs[6]["skipped_steps"] == 2
    assert all(torch.isfinite(torch.tensor(recs[s]["loss"])) for s in (5, 6))
    weights = checkpoint_weights(tmp_path / "checkpoints" / "step_6")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_skip_stops_past_the_limit(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, set(range(4, 100)))
    with pytest.raises(NonFiniteError, match="max_skipped_steps=2"):
        run(config(tmp_path, "train.steps=10", "checkpoint.every=2", "train.nonfinite=skip",
                   "train.max_skipped_steps=2"))
    assert saved_steps(tmp_path) == [2, 4]  # steps 4, 5 skipped, the third (6) stops before saving


# --- damaged checkpoints ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run, and a run dir holding the checkpoints of steps 2 and 4 of the same run."""
    root = tmp_path_factory.mktemp("ref")
    run(config(root / "full", "train.steps=6", "checkpoint.every=0"))
    run(config(root / "saved", "train.steps=4", "checkpoint.every=2"))
    return losses(root / "full"), root / "saved"


def _damage_and_resume(reference, tmp_path, damage, capsys):
    ref, saved = reference
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    damage(tmp_path / "checkpoints" / "step_4")
    run(config(tmp_path, "train.steps=6", "checkpoint.every=0"))
    out = capsys.readouterr().out
    resumed = losses(tmp_path)
    assert [resumed[s] for s in (3, 4, 5, 6)] == [ref[s] for s in (3, 4, 5, 6)]  # exact, from step 2
    assert os.path.isdir(tmp_path / "checkpoints" / "step_4.corrupt")  # set aside, not deleted
    return out


def test_truncated_shard_falls_back_to_previous_checkpoint(reference, tmp_path, capsys):
    def truncate(ckpt):
        shard = ckpt / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])

    out = _damage_and_resume(reference, tmp_path, truncate, capsys)
    assert "step_4 is unusable (__0_0.distcp has 1000 bytes" in out, out
    assert "resumed from" in out and "step_2" in out


def test_deleted_metadata_falls_back(reference, tmp_path, capsys):
    out = _damage_and_resume(reference, tmp_path, lambda ckpt: os.remove(ckpt / ".metadata"), capsys)
    assert ".metadata is missing" in out, out


def test_missing_rng_state_is_a_damaged_checkpoint(reference, tmp_path, capsys):
    out = _damage_and_resume(reference, tmp_path, lambda ckpt: os.remove(ckpt / "rng_rank0.pt"), capsys)
    assert "rng_rank0.pt is missing" in out, out


def test_dcp_error_without_file_list_falls_back(reference, tmp_path, capsys):
    # checkpoints whose meta.json lists no files: DCP's own error (a BaseException) must still mean "fall back"
    def truncate_unlisted(ckpt):
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["files"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
        shard = ckpt / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])

    out = _damage_and_resume(reference, tmp_path, truncate_unlisted, capsys)
    assert "DCP cannot load" in out, out


def test_no_usable_checkpoint_is_one_clear_error(reference, tmp_path, capsys):
    from train.__main__ import main

    _, saved = reference
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    for step in (2, 4):
        os.remove(tmp_path / "checkpoints" / f"step_{step}" / ".metadata")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        run(config(tmp_path, "train.steps=6"))
    for step in (2, 4):  # set aside, not deleted; a second attempt reports the same plainly
        os.rename(tmp_path / "checkpoints" / f"step_{step}.corrupt", tmp_path / "checkpoints" / f"step_{step}")
    capsys.readouterr()
    args = [f"config={ROOT}/configs/tiny.yaml", *RUN_SMALL, f"run_dir={tmp_path}", "train.steps=6"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no usable checkpoint") and "Traceback" not in err, err


# --- config changes on resume -----------------------------------------------------------------------------------

def test_resume_with_another_architecture_is_refused_before_writing(reference, tmp_path):
    _, saved = reference
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"model\.dim.*64 -> 96"):
        run(config(tmp_path, "train.steps=6", "model.dim=96"))
    assert (tmp_path / "config.yaml").read_text() == before


def test_resume_refuses_optimizer_changes_and_records_allowed_ones(reference, tmp_path):
    _, saved = reference
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        run(config(tmp_path, "train.steps=6", "optim.lr=1e-4"))
    run(config(tmp_path, "train.steps=6", "train.log_every=2", "checkpoint.every=2", "checkpoint.keep=3"))
    resumes = [r for r in records(tmp_path) if "resumed_from" in r]
    assert len(resumes) == 1 and resumes[0]["step"] == 4
    assert resumes[0]["changed"] == {"checkpoint.keep": {"from": 2, "to": 3}, "train.log_every": {"from": 1, "to": 2},
                                     "train.steps": {"from": 4, "to": 6}}


def test_raising_steps_keeps_the_schedule(tmp_path):
    run(config(tmp_path, "train.steps=4", "optim.warmup_steps=1", "checkpoint.every=0"))
    cfg = config(tmp_path, "train.steps=7", "optim.warmup_steps=1", "checkpoint.every=0")
    run(cfg)
    lrs = {r["step"]: r["lr"] for r in records(tmp_path) if "lr" in r}
    final_lr = cfg.optim.lr * cfg.optim.min_lr_ratio
    assert [lrs[s] for s in (5, 6, 7)] == pytest.approx([final_lr] * 3)  # not a re-stretched cosine


def test_tokens_continue_from_the_checkpoint(tmp_path):
    run(config(tmp_path, "train.steps=4", "checkpoint.every=0"))  # 4 sequences of 32 tokens per step
    run(config(tmp_path, "train.steps=6", "train.batch_size=2", "checkpoint.every=0"))  # 2 per step now
    tokens = {r["step"]: r["tokens"] for r in records(tmp_path) if "tokens" in r}
    assert tokens[4] == 4 * 4 * 32 and tokens[6] == tokens[4] + 2 * 2 * 32


def test_checkpoint_without_the_newer_meta_fields_still_resumes(tmp_path):
    """Older checkpoints' meta.json lacks the counters, the schedule's horizon, the run config and the file list:
    they still resume exactly (tokens and skipped steps counted from the resume, the schedule over train.steps)."""
    run(config(tmp_path / "full", "train.steps=4", "checkpoint.every=0"))
    old = tmp_path / "old"
    run(config(old, "train.steps=4", "checkpoint.every=2"))
    shutil.rmtree(old / "checkpoints" / "step_4")
    meta_path = old / "checkpoints" / "step_2" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("tokens_seen", "skipped_steps", "schedule_steps", "train_config", "files"):
        del meta[key]
    meta_path.write_text(json.dumps(meta))
    run(config(old, "train.steps=4", "checkpoint.every=2"))
    assert losses(old) == losses(tmp_path / "full")
    assert [r["tokens"] for r in records(old) if r.get("step") == 4 and "tokens" in r] == [2 * 4 * 32]


def test_rerunning_a_finished_run_appends_nothing(tmp_path):
    first = run(config(tmp_path, "train.steps=3", "checkpoint.every=0"))
    before = (tmp_path / "metrics.jsonl").read_text()
    again = run(config(tmp_path, "train.steps=3", "checkpoint.every=0"))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert again == first


def test_rng_files_of_ranks_that_are_not_resuming_are_not_required(tmp_path):
    from train.checkpoint import verify_checkpoint

    for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt"):
        (tmp_path / name).write_bytes(b"x" * 10)
    meta = {"files": {n: 10 for n in (".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt")}}
    assert verify_checkpoint(str(tmp_path), meta, world_size=1) is None  # saved on 2 ranks, resumed on 1
    assert verify_checkpoint(str(tmp_path), meta, world_size=2) == "rng_rank1.pt is missing"
    assert verify_checkpoint(str(tmp_path), {}, world_size=2) is None  # no file list: left to DCP
