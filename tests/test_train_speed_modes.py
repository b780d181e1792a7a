"""Opt-in speed modes of the training step change how it runs, not what it learns: clipping inside the fused
AdamW (optim.clip_in_optimizer), a bf16 residual stream (model.residual_dtype=autocast), the whole model compiled
as one program (train.compile_scope=model). Defaults are untouched (tests/test_train_loop.py's exact losses)."""
import json
import os

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from _train_helpers import RUN_SMALL, STEP_SMALL
from train.builder import build_training
from train.config import ConfigError, load_config
from train.distributed import check_layout
from train.loop import run
from train.optim import set_clip_scale
from train.runtime import setup_runtime
from train.step import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def build(*overrides, device="cpu"):
    os.environ.pop("WORLD_SIZE", None)
    cfg = load_config(TINY, STEP_SMALL + [f"train.device={device}"] + list(overrides))
    rt = setup_runtime(cfg)
    return cfg, rt, build_training(cfg, rt)


def train(*overrides, steps=5, device="cpu"):
    cfg, rt, state = build(*overrides, device=device)
    g = torch.Generator().manual_seed(7)
    losses, norms = [], []
    for _ in range(steps):
        batch = torch.randint(0, 4096, (3, 17), generator=g)
        loss, (norm, _) = train_step(state.model, state.optimizer, state.scheduler, [batch], cfg, rt)
        losses.append(float(loss))
        norms.append(float(norm))
    return losses, norms, state


def params(state):
    return {n: p.detach().clone() for n, p in state.model.named_parameters()}


# ------------------------------------------------------------------------------------------ clip in the optimizer
@pytest.mark.parametrize("value_rule", ["adamw", "rowwise_adagrad"])
def test_clip_in_optimizer_matches_a_separate_clip(value_rule):
    # a clip far below the gradient norm: every step is clipped, so a missing or wrong scale shows at once;
    # row-wise Adagrad: the value rows divide by the optimizer's grad_scale in their own rule
    clip = ["optim.grad_clip=0.05", f"optim.value_optimizer={value_rule}"]
    ref_losses, ref_norms, ref = train(*clip)
    losses, norms, folded = train(*clip, "optim.clip_in_optimizer=true")
    assert min(ref_norms) > 0.5  # clipped by 10x or more
    assert folded.optimizer.defaults["fused"] and not ref.optimizer.defaults["fused"]
    assert losses == pytest.approx(ref_losses, rel=1e-5) and norms == pytest.approx(ref_norms, rel=1e-4)
    want, got = params(ref), params(folded)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5, msg=n)  # a wrong clip: ~lr = 1e-2


def test_clip_in_optimizer_without_clipping_scales_nothing():
    _, _, state = build("optim.clip_in_optimizer=true", "optim.grad_clip=0")
    set_clip_scale(state.optimizer, torch.tensor(5.0), 0.0)
    assert state.optimizer.grad_scale is None
    set_clip_scale(state.optimizer, torch.tensor(0.5), 1.0)  # under the limit: factor 1
    assert float(state.optimizer.grad_scale) == 1.0
    set_clip_scale(state.optimizer, torch.tensor(4.0), 1.0)
    assert float(state.optimizer.grad_scale) == pytest.approx(4.0)


def test_clip_in_optimizer_refuses_an_optimizer_without_a_grad_scale():
    _, _, state = build()  # the default CPU optimizer is not fused
    with pytest.raises(TypeError, match="fused AdamW"):
        set_clip_scale(state.optimizer, torch.tensor(2.0), 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["dist.memory_parallel=2"], ["dist.memory_parallel=1"]])
def test_clip_in_optimizer_on_sharded_gradients(layout):
    """FSDP's sharded gradients and a column-sharded (or replicated) value table take the clip factor inside the
    step as one process does with a separate clip pass: every step clipped by 10x or more."""
    from test_train_distributed import assert_same, reference, run_distributed

    clip = ["optim.grad_clip=0.05"]
    assert_same(run_distributed(2, layout + clip + ["optim.clip_in_optimizer=true"]), reference(2, overrides=clip))


def test_whole_model_compile_is_one_process_only():
    cfg = load_config(TINY, ["train.compile=true", "train.compile_scope=model"])
    check_layout(cfg, world_size=1)
    with pytest.raises(ConfigError, match="train.compile_scope"):
        check_layout(cfg, world_size=2)
    check_layout(load_config(TINY, ["train.compile_scope=model"]), world_size=2)  # no compile: nothing to refuse


# ------------------------------------------------------------------------------------------ bf16 residual stream
def test_bf16_residual_stream_trains_like_the_fp32_stream():
    # CPU bf16 autocast, the memory layers included (STEP_SMALL: shared values at both blocks)
    ref, _, ref_state = train("train.precision=bf16")
    got, _, state = train("train.precision=bf16", "model.residual_dtype=autocast")
    assert all(torch.isfinite(torch.tensor(got)))
    assert got == pytest.approx(ref, abs=0.03)
    assert got != ref  # the stream really is rounded differently
    assert list(get_state_dict(state.model, state.optimizer)[0]) == list(get_state_dict(ref_state.model,
                                                                                        ref_state.optimizer)[0])


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_speed_modes_resume_exactly(tmp_path):
    """Checkpoints of a run with both modes on round-trip: an interrupted run continues bit-exactly."""
    modes = ["train.precision=bf16", "model.residual_dtype=autocast", "optim.clip_in_optimizer=true",
             "optim.grad_clip=0.1", "train.steps=6"]

    def cfg(run_dir, *extra):
        return load_config(TINY, RUN_SMALL + modes + ["train.device=cpu", f"run_dir={run_dir}"] + list(extra))

    run(cfg(tmp_path / "full", "checkpoint.every=0"))
    run(cfg(tmp_path / "cut", "checkpoint.every=3", "train.steps=3"))
    run(cfg(tmp_path / "cut", "checkpoint.every=3"))
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 7))
    assert [cut[s] for s in range(4, 7)] == [full[s] for s in range(4, 7)]


def test_clip_in_optimizer_can_be_switched_on_at_resume(tmp_path):
    """A warned key: the resumed run must get the fused optimizer it needs, not the saved groups' kernel choice."""
    def cfg(*extra):
        return load_config(TINY, RUN_SMALL + ["train.device=cpu", "optim.grad_clip=0.1", f"run_dir={tmp_path}",
                                              "checkpoint.every=3"] + list(extra))

    run(cfg("train.steps=3"))
    run(cfg("train.steps=5", "optim.clip_in_optimizer=true"))
    assert sorted(_losses(tmp_path)) == list(range(1, 6))


@pytest.mark.slow
def test_whole_model_compile_keeps_names_and_losses():
    """train.compile_scope=model compiles the Transformer in place: no wrapper module anywhere (parameter names and
    checkpoint keys are the plain model's), the memory blocks' graph breaks (CPU reference backend) are fine, and
    the losses are the eager ones up to compiled rounding."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    eager, _, plain = train(steps=3)
    torch._dynamo.reset()
    counters.clear()
    compiled, _, state = train("train.compile=true", "train.compile_scope=model", steps=3)
    model = state.model
    assert model._compiled_call_impl is not None
    assert not any(isinstance(m, OptimizedModule) for m in model.modules())
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert list(model.state_dict()) == list(plain.model.state_dict())
    assert list(get_state_dict(model, state.optimizer)[0]) == list(get_state_dict(plain.model, plain.optimizer)[0])
    assert compiled == pytest.approx(eager, rel=1e-5)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_speed_modes_on_cuda():
    """All three options at once on a GPU (Triton memory kernels, bf16 autocast, the whole model compiled): losses
    near the default step's, compiled once (no recompilation after the first step)."""
    from torch._dynamo.utils import counters

    ref, _, _ = train("train.precision=bf16", steps=6, device="cuda")
    torch._dynamo.reset()
    counters.clear()
    modes = ["train.precision=bf16", "model.residual_dtype=autocast", "train.compile=true",
             "train.compile_scope=model", "optim.clip_in_optimizer=true"]
    train(*modes, steps=1, device="cuda")
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    got, _, state = train(*modes, steps=6, device="cuda")
    assert counters["stats"]["unique_graphs"] == graphs  # steps 2-6 reuse the first step's graphs
    assert state.optimizer.defaults["fused"] and state.optimizer.grad_scale is not None
    assert all(torch.isfinite(torch.tensor(got)))
    assert got == pytest.approx(ref, abs=0.05)
    torch._dynamo.reset()
