"""bf16 weights with fp32 masters for the blocks' linear layers (train.weight_dtype, train/master_weights.py).

The kernel steps a master with its copy's bf16 gradient and writes the copy as torch's round-to-nearest-even cast;
a trainer step with bf16 weights equals the autocast step with fp32 weights bit for bit (CPU bf16 autocast, the Triton
kernel interpreted); checkpoints hold the masters, so runs resume exactly and load into either weight dtype; configs
that cannot take bf16 weights are refused by key.
"""
import os

import pytest
import torch

from _train_helpers import STEP_SMALL
from ops.triton_adamw import adamw_step
from test_train_adamw import EPS, LR, WD, device, kernel_steps, tensors, torch_reference
from test_train_loop import config, losses
from test_train_speed_modes import build, train
from train.builder import build_training
from train.config import ConfigError, load_config
from train.loop import run
from train.runtime import setup_runtime
from train.step import train_step
from train.weights import load_model_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
BF16 = torch.bfloat16
# bf16 autocast on the CPU, the AdamW kernel interpreted, clipping that bites (inside the optimizer, as bf16
# weights need)
MODES = ["train.precision=bf16", "optim.adamw_kernel=triton", "optim.clip_in_optimizer=true", "optim.grad_clip=0.05"]


# ------------------------------------------------------------------------------------------------------- kernel
@pytest.mark.any_device
@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_steps_masters_by_bf16_gradients_and_writes_copies_rounded(scaled):
    dev = device()
    masters = tensors(dev)  # sizes over several programs, unaligned views, an empty tensor and a scalar
    copies = [m.to(BF16) for m in masters]
    grads_per_step = [[torch.randn_like(m).to(BF16) for m in masters] for _ in range(3)]
    grad_scale = torch.tensor(2.5, device=dev) if scaled else None
    want, _ = torch_reference(masters, [[g.float() for g in gs] for gs in grads_per_step], grad_scale=grad_scale)
    ps = kernel_steps(masters, grads_per_step, grad_scale, copies)
    for got, copy, ref, m0 in zip(ps, copies, want, masters):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        assert torch.equal(copy, got.to(BF16))  # bit for bit the cast autocast would make
        if m0.numel() > 1:  # (one element's step may stay within its bf16 rounding)
            assert not torch.equal(copy, m0.to(BF16))


def test_kernel_rounds_to_nearest_even_at_ties_and_keeps_specials():
    """Every fp32 -> bf16 rounding case a copy can meet, against torch's cast of the updated master: ties (to even),
    carries into the exponent, overflow to inf, subnormals, zero, inf and NaN (lr 0 leaves the finite masters as
    they were; an inf master becomes NaN by AdamW's own arithmetic, as in torch)."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001,
                         0x80008000, 0x00000000, 0x7F800000, 0x7FC00000, 0x7F800001, 0xFFC00001],
                        dtype=torch.int64).to(torch.int32)
    values = torch.cat([bits.view(torch.float32), torch.randn(50, generator=torch.Generator().manual_seed(0))])
    p, copy = values.clone(), torch.zeros(values.shape, dtype=BF16)
    adamw_step([p], [torch.zeros_like(copy)], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.ones(())], lr=0.0,
               weight_decay=0.0, beta1=0.9, beta2=0.95, eps=EPS, copies=[copy])
    finite = torch.isfinite(values)
    assert torch.equal(p[finite], values[finite])
    want = p.to(BF16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(copy), nan) and nan.sum() == 4
    assert torch.equal(copy[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert torch.isinf(copy[4]) and torch.isinf(copy[5])  # rounded past bf16's largest finite value


def test_kernel_refuses_gradients_and_copies_of_other_dtypes():
    p = torch.zeros(8)
    state = ([torch.zeros(8)], [torch.zeros(8)], [torch.ones(())])
    kw = dict(lr=LR, weight_decay=WD, beta1=0.9, beta2=0.95, eps=EPS)
    with pytest.raises(ValueError, match="bf16"):
        adamw_step([p], [torch.zeros(8)], *state, copies=[torch.zeros(8, dtype=BF16)], **kw)  # an fp32 gradient
    with pytest.raises(ValueError, match="copy"):
        adamw_step([p], [torch.zeros(8, dtype=BF16)], *state, copies=[torch.zeros(8)], **kw)  # an fp32 copy


# ------------------------------------------------------------------------------------------------ training step
def test_bf16_weights_step_exactly_as_autocast_does():
    ref_losses, ref_norms, ref_state = train(*MODES, "train.weight_dtype=fp32", steps=4)
    got_losses, got_norms, state = train(*MODES, "train.weight_dtype=bf16", steps=4)
    assert got_losses == ref_losses and got_norms == ref_norms  # bit for bit (the clip bit: norms above 0.05)
    assert min(got_norms) > 0.05
    masters = state.optimizer.masters
    linear = {n for n, m in state.model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")}
    for name, p in state.model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in linear and leaf == "weight":
            assert p.dtype == BF16 and torch.equal(p, masters.master_of(p).to(BF16)), name
            assert state.optimizer.state[p]["exp_avg"].dtype == torch.float32
        else:
            assert p.dtype == torch.float32 and masters.master_of(p) is None, name  # embeddings, norms, biases, keys
    assert len(masters) == len(linear)
    # the state dict holds the masters: what the fp32 run holds, key for key and bit for bit
    sd, ref_sd = state.model.state_dict(), ref_state.model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(sd[k].dtype == ref_sd[k].dtype and torch.equal(sd[k], ref_sd[k]) for k in sd)


def test_auto_keeps_fp32_weights_on_a_cpu():
    _, _, state = build("train.precision=bf16", "optim.clip_in_optimizer=true")
    assert state.optimizer.masters is None
    assert all(p.dtype == torch.float32 for p in state.model.parameters())


def test_auto_takes_bf16_weights_on_one_gpu_and_fp32_where_fsdp_shards():
    from types import SimpleNamespace

    from train.master_weights import resolve_weight_dtype

    def rt(world_size):  # a run's device facts, without a GPU
        return SimpleNamespace(dtype=BF16, world_size=world_size, device=torch.device("cuda"))

    cfg = load_config(TINY, STEP_SMALL + ["optim.clip_in_optimizer=true"])  # adamw_kernel=auto
    assert resolve_weight_dtype(cfg, rt(1)) == "bf16"
    assert resolve_weight_dtype(cfg, rt(2)) == "fp32"
    explicit = load_config(TINY, STEP_SMALL + ["optim.clip_in_optimizer=true", "train.weight_dtype=bf16"])
    with pytest.raises(ConfigError, match="train.weight_dtype=bf16.*FSDP2"):
        resolve_weight_dtype(explicit, rt(2))


@pytest.mark.parametrize("overrides, key", [
    (["train.precision=fp32"], "train.precision=fp32"),
    (["train.grad_accum=2"], "train.grad_accum=2"),
    (["optim.adamw_kernel=torch"], "optim.adamw_kernel=torch"),
    (["optim.clip_in_optimizer=false"], "optim.clip_in_optimizer=false"),
])
def test_configs_that_cannot_take_bf16_weights_are_refused_by_key(overrides, key):
    with pytest.raises(ConfigError, match=f"train.weight_dtype=bf16.*{key}"):
        load_config(TINY, STEP_SMALL + MODES + ["train.weight_dtype=bf16"] + overrides)


def test_bf16_weights_without_the_kernel_on_this_device_are_refused_before_any_step():
    with pytest.raises(ConfigError, match="train.weight_dtype=bf16.*optim.adamw_kernel=triton"):
        build(*MODES, "train.weight_dtype=bf16", "optim.adamw_kernel=auto")
    with pytest.raises(ConfigError, match="train.weight_dtype=bf16.*autocast"):
        build("optim.adamw_kernel=triton", "optim.clip_in_optimizer=true", "train.weight_dtype=bf16")  # CPU: fp32


# ------------------------------------------------------------------------------------------------- checkpoints
def run_config(run_dir, *extra):
    return config(run_dir, *MODES, "train.device=cpu", *extra)


@pytest.mark.slow
def test_checkpoints_hold_the_masters_and_resume_exactly_in_either_weight_dtype(tmp_path):
    """A run with bf16 weights stopped at step 3 continues bit for bit, whether resumed with bf16 or fp32 weights
    (the checkpoint is the fp32 run's, tensor for tensor), and an fp32 run's checkpoint resumes with bf16 weights."""
    run(run_config(tmp_path / "full", "train.weight_dtype=fp32", "train.steps=6", "checkpoint.every=0"))
    full = losses(tmp_path / "full")
    for first, then in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "bf16")):
        d = tmp_path / f"{first}_{then}"
        run(run_config(d, f"train.weight_dtype={first}", "train.steps=3", "checkpoint.every=3"))
        run(run_config(d, f"train.weight_dtype={then}", "train.steps=6", "checkpoint.every=3"))
        assert losses(d) == full, (first, then)


def test_init_from_an_export_sets_the_masters_exactly(tmp_path):
    """Weights loaded into a model with bf16 weights (an fp32 export's safetensors, and a checkpoint through DCP)
    reach the masters unrounded; the bf16 weights are their rounding."""
    from model.checkpoint import load_model
    from train.export import main as export_main

    source = tmp_path / "source"
    run(run_config(source, "train.weight_dtype=fp32", "train.steps=2", "checkpoint.every=0"))
    export_main([f"checkpoint={source}", f"out={tmp_path / 'exported'}"])
    want = load_model(str(source))[0].state_dict()
    for path in (tmp_path / "exported", source):
        cfg = run_config(tmp_path / "target", "train.weight_dtype=bf16")
        state = build_training(cfg, setup_runtime(cfg))
        assert load_model_weights(str(path), state.model) == []
        got = state.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items() if k in got)
        for p in state.optimizer.masters.parameters():
            assert torch.equal(p, state.optimizer.masters.master_of(p).to(BF16))


@pytest.mark.gpu
def test_bf16_weights_on_cuda_compiled():
    """On a GPU, auto takes bf16 weights (the Triton kernel, compiled blocks): the losses stay the autocast run's
    (compiled code may round differently, so within 1e-3), and every weight is its master rounded, bit for bit."""
    gpu = ["train.device=cuda", "train.precision=bf16", "optim.clip_in_optimizer=true", "train.compile=true"]

    def run_steps(*extra):
        torch._dynamo.reset()
        cfg = load_config(TINY, STEP_SMALL + gpu + list(extra))
        rt = setup_runtime(cfg)
        state = build_training(cfg, rt)
        g = torch.Generator().manual_seed(7)
        out = [float(train_step(state.model, state.optimizer, state.scheduler,
                                [torch.randint(0, 4096, (3, 17), generator=g)], cfg, rt)[0]) for _ in range(4)]
        return out, state

    ref, _ = run_steps("train.weight_dtype=fp32")
    got, state = run_steps()  # auto
    masters = state.optimizer.masters
    assert masters is not None and len(masters) > 0
    for p in masters.parameters():
        assert p.dtype == BF16 and p.is_cuda and torch.equal(p, masters.master_of(p).to(BF16))
    assert got == pytest.approx(ref, abs=1e-3)
    torch._dynamo.reset()
