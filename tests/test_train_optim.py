"""Optimizer groups: the value table's learning rate (absolute, or a multiple of the base rate)."""
import os

import pytest

from _train_helpers import STEP_SMALL
from train.builder import build_model
from train.config import ConfigError, load_config
from train.optim import build_optimizer, build_scheduler
from train.runtime import setup_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = [o for o in STEP_SMALL if not o.startswith("optim.value_lr=")] + ["optim.lr=2e-3", "optim.value_lr=null", "optim.warmup_steps=0"]


def group_lrs(*extra):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), BASE + list(extra))
    model = build_model(cfg, setup_runtime(cfg))
    opt = build_optimizer(model, cfg.optim)
    build_scheduler(opt, cfg.optim, cfg.train.steps)  # step 0 of warmup-free cosine: factor 1
    return {g["name"]: g["lr"] for g in opt.param_groups}


@pytest.mark.parametrize("extra, value_lr", [
    ((), 2e-2),  # default: 10x the base rate
    (("optim.value_lr_mult=3",), 6e-3),
    (("optim.value_lr=5e-4",), 5e-4),  # an absolute rate wins over the multiple
    (("optim.value_lr=5e-4", "optim.value_lr_mult=3"), 5e-4),
])
def test_value_group_rate(extra, value_lr):
    lrs = group_lrs(*extra)
    assert lrs["values"] == pytest.approx(value_lr, rel=1e-12)
    assert lrs["decay"] == lrs["no_decay"] == pytest.approx(2e-3, rel=1e-12)


@pytest.mark.parametrize("override, key", [("optim.value_lr=0", "optim.value_lr"), ("optim.value_lr_mult=-1", "optim.value_lr_mult")])
def test_bad_value_rate_is_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), BASE + [override])


def test_value_group_holds_the_value_tables_of_any_name():
    """Value tables are found by type: a table under another name still gets the value rate, and a parameter that
    is merely called like one does not."""
    import torch
    from torch import nn

    from model import ValuePool
    from train.optim import param_groups

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), BASE).optim
    model = nn.Module()
    model.table = ValuePool(8, 4, init_std=1.0)
    model.values = nn.Module()
    model.values.weight = nn.Parameter(torch.zeros(3, 4))
    groups = {g["name"]: g["params"] for g in param_groups(model, cfg)}
    assert groups["values"] == [model.table.weight]
    assert groups["decay"] == [model.values.weight]
