"""train.trainable: frozen parameters stay bit-identical through training steps and get no optimizer state."""
import os
import shutil

import pytest
import torch

from _train_helpers import RUN_SMALL, STEP_SMALL
from train.builder import build_model, build_training
from train.config import ConfigError, load_config
from train.loop import run
from train.runtime import setup_runtime
from train.step import train_step
from train.trainable import apply_trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED = {
    "values": {"values.weight"},
    "memory": {"values.weight"} | {f"layers.{i}.memory.{p}" for i in (0, 1) for p in
                                   ("keys1", "keys2", "query_proj.weight", "query_proj.bias", "query_norm.weight")},
    "ffn": set(),  # STEP_SMALL has memory layers at both blocks: no FFN (checked to raise below)
}


def step_config(*extra):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + list(extra))


def train_three_steps(state, cfg, rt):
    """Three optimizer steps of a built training stack on seeded random batches."""
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=g)
        train_step(state.model, state.optimizer, state.scheduler, [batch], cfg, rt)


@pytest.mark.parametrize("value_optimizer", ["adamw", "rowwise_adagrad"])
@pytest.mark.parametrize("which", ["values", "memory"])
def test_frozen_parameters_bit_identical_and_without_optimizer_state(which, value_optimizer):
    cfg = step_config(f"train.trainable={which}", f"optim.value_optimizer={value_optimizer}")
    rt = setup_runtime(cfg)
    try:
        state = build_training(cfg, rt)
        model, optimizer = state.model, state.optimizer
        assert {n for n, p in model.named_parameters() if p.requires_grad} == EXPECTED[which]
        assert state.n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in EXPECTED[which])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_three_steps(state, cfg, rt)
        for n, p in model.named_parameters():
            if n in EXPECTED[which]:
                assert not torch.equal(p, before[n]), f"{n} is trainable but did not change"
            else:
                assert torch.equal(p, before[n]), f"{n} is frozen but changed"
                assert p.grad is None
        by_id = {id(p): n for n, p in model.named_parameters()}
        with_state = {by_id[id(p)] for p in optimizer.state}
        in_groups = {by_id[id(p)] for grp in optimizer.param_groups for p in grp["params"]}
        assert with_state == in_groups == EXPECTED[which]
    finally:
        rt.close()


def test_ffn_only_trains_the_feed_forward_blocks():
    cfg = step_config("model.memory.layers=[1]", "train.trainable=ffn")
    model = build_model(cfg, setup_runtime(cfg))
    names = apply_trainable(model, "ffn")
    assert set(names) == {f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())


def test_selection_that_matches_nothing_or_unknown_name_is_an_error():
    cfg = step_config("train.trainable=ffn")  # memory at every block: no FFN
    model = build_model(cfg, setup_runtime(cfg))
    with pytest.raises(ValueError, match="train.trainable: 'ffn' selects no parameter"):
        apply_trainable(model, "ffn")
    with pytest.raises(ConfigError, match=r"train.trainable: Invalid value 'keys', expected one of \['all', 'memory'"):
        step_config("train.trainable=keys")


def test_the_trainable_choices_are_the_selectors():
    from typing import get_args

    from train.config import Trainable
    from train.trainable import SELECTORS

    assert set(get_args(Trainable)) == set(SELECTORS)


def test_values_only_run_resumes_exactly(tmp_path):
    def cfg(run_dir, *extra):
        return load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                           RUN_SMALL + [f"run_dir={run_dir}", "train.steps=6", "train.trainable=values", *extra])

    import json

    def losses(run_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}

    run(cfg(tmp_path / "full", "checkpoint.every=0"))
    part = tmp_path / "part"
    run(cfg(part, "checkpoint.every=3"))
    shutil.rmtree(part / "checkpoints" / "step_6")
    run(cfg(part, "checkpoint.every=3"))
    assert [losses(part)[s] for s in (4, 5, 6)] == [losses(tmp_path / "full")[s] for s in (4, 5, 6)]


@pytest.mark.parametrize("value_optimizer", ["adamw", "sparse_adam", "rowwise_adagrad"])
def test_trainable_rows_limit_value_updates_to_the_listed_rows(tmp_path, value_optimizer):
    import json

    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(list(range(0, 64, 2))))  # even rows of the 8**2-row table
    cfg = step_config("train.trainable=values", f"train.trainable_rows={rows_file}",
                      f"optim.value_optimizer={value_optimizer}")
    rt = setup_runtime(cfg)
    state = build_training(cfg, rt)  # selects the values, then limits their updates to the listed rows
    model = state.model
    from train.trainable import restrict_value_rows

    before = model.values.weight.detach().clone()
    train_three_steps(state, cfg, rt)
    after = model.values.weight.detach()
    assert torch.equal(after[1::2], before[1::2])  # unlisted rows: bit-identical
    assert (after[0::2] != before[0::2]).any(dim=1).sum() > 10  # listed rows that were read moved
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 64]")
    with pytest.raises(ValueError, match="trainable_rows: .* row indices in \\[0, 64\\)"):
        restrict_value_rows(model, str(bad))
