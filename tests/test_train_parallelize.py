"""Activation checkpointing and torch.compile change how a step runs, never what it computes or what it saves."""
import os

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from _train_helpers import STEP_SMALL
from train.config import load_config
from train.builder import build_training
from train.runtime import setup_runtime
from train.step import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(*overrides):
    os.environ.pop("WORLD_SIZE", None)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + list(overrides))
    rt = setup_runtime(cfg)
    return cfg, rt, build_training(cfg, rt)


def train_losses(*overrides):
    cfg, rt, state = build(*overrides)
    model, opt, sched = state.model, state.optimizer, state.scheduler
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(cfg.train.steps):
        batch = torch.randint(0, 4096, (3, 17), generator=g)
        loss, _ = train_step(model, opt, sched, [batch], cfg, rt)
        losses.append(float(loss))
    return losses, model, opt


def test_activation_checkpointing_keeps_losses_and_checkpoint_keys():
    plain, plain_model, plain_opt = train_losses()
    ac, ac_model, ac_opt = train_losses("train.activation_checkpointing=true")
    assert ac == pytest.approx(plain, rel=1e-6, abs=1e-7)
    assert list(ac_model.state_dict()) == list(plain_model.state_dict())
    assert list(get_state_dict(ac_model, ac_opt)[0]) == list(get_state_dict(plain_model, plain_opt)[0])
    # recomputation really happens: each block's forward runs again in backward (forward hooks are not re-run
    # by the recomputation, so count calls of forward itself)
    model = build("train.activation_checkpointing=true")[2].model
    calls = []
    for i, wrapper in enumerate(model.layers):
        block = wrapper._checkpoint_wrapped_module
        block.forward = (lambda f, i: lambda *a, **k: calls.append(i) or f(*a, **k))(block.forward, i)
    model(torch.randint(0, 4096, (2, 16))).float().mean().backward()
    assert sorted(calls) == [0, 0, 1, 1]


@pytest.mark.slow
def test_checkpointed_blocks_stay_compiled():
    """On CPU the memory layer's reference backend has a graph break (torch.unique), like the column-parallel
    lookup on GPUs. Checkpointing inside a compiled block would make dynamo run such a block wholly eagerly; the
    trainer checkpoints around the compiled block, so the block's graphs are still captured."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build("train.compile=true", "train.activation_checkpointing=true")[2].model
    model(torch.randint(0, 4096, (2, 16))).float().mean().backward()
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
