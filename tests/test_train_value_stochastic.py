"""A bf16 value table updated with stochastic rounding (optim.value_precision=bf16_stochastic): no fp32 master,
bf16 Adam moments, every write rounded to a random bf16 neighbour, up with probability (x - lower) / ulp.

The rules on both backends (the Triton kernel interpreted on CPU): each written value is one of the two bf16
neighbours of the exact fp32 update, updates far below the table's resolution move it in expectation (round to
nearest would drop them), unread rows stay bit-identical, the bits depend only on (seed, row, global column). Then the
optimizer object: state size, training, resume, config errors.
"""
import os

import pytest
import torch

from _train_helpers import STEP_SMALL
from ops import row_optim
from test_train_loop import config, losses
from test_train_value_master import tiny
from test_train_value_optim import BETAS, EPS, LR, READS, UNREAD, WD, D, N, device_of, sparse_grads
from train.config import ConfigError, load_config
from train.loop import run
from train.optim import build_optimizer, build_scheduler
from train.step import train_step
from train.value_optim import optimizer_state_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = torch.bfloat16


def neighbours(exact: torch.Tensor):
    """The bf16 values just below and just above each fp32 value (equal when it is representable)."""
    lo = exact.to(BF16)
    lo = torch.where(lo.float() > exact, torch.nextafter(lo, torch.full_like(lo, -float("inf"))), lo)
    hi = torch.where(lo.float() < exact, torch.nextafter(lo, torch.full_like(lo, float("inf"))), lo)
    return lo, hi


def assert_neighbour(out: torch.Tensor, exact: torch.Tensor):
    lo, hi = neighbours(exact)
    assert out.dtype == BF16
    assert ((out == lo) | (out == hi)).all(), "a written value is not a bf16 neighbour of the exact update"


def adam_step(backend, table, grad, m, v, seed, lr, col0=0, wd=0.0):
    row_optim.lazy_adam_rows(table, grad, m, v, lr=lr, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=wd,
                             step=1, rounding_seed=seed, rng_col0=col0, backend=backend)


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_updates_below_resolution_move_the_table_in_expectation(backend):
    """Adam's first step moves every weight by lr: here a quarter of bf16's spacing below 1.0, so round to nearest
    would leave the table at 1.0. Stochastic rounding puts a quarter of the weights one spacing lower: the mean is
    the exact update."""
    dev = device_of(backend)
    n, d, spacing = 64, 256, 2.0 ** -8  # bf16 spacing just below 1.0
    table = torch.ones(n, d, dtype=BF16, device=dev)
    grad = torch.ones(n, d, dtype=BF16, device=dev)
    m, v = torch.zeros_like(table), torch.zeros_like(table)
    adam_step(backend, table, grad, m, v, seed=11, lr=spacing / 4)
    t = table.float().cpu()
    assert ((t == 1.0) | (t == 1.0 - spacing)).all()
    down = (t < 1).float().mean().item()
    assert abs(down - 0.25) < 0.02, down  # 16384 draws: std 0.0034
    assert abs(t.mean().item() - (1.0 - spacing / 4)) < 0.1 * spacing / 4
    # the moments are bf16 neighbours of their exact values (0.1 * g and 0.05 * g^2)
    assert_neighbour(m.cpu(), torch.full((n, d), 1 - BETAS[0]))
    assert_neighbour(v.cpu(), torch.full((n, d), 1 - BETAS[1]))


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rule", ["lazy_adam", "rowwise_adagrad"])
def test_every_write_is_a_neighbour_of_the_exact_update_and_unread_rows_stay(rule, backend):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(1)
    start = torch.randn(12, 6, generator=g).to(BF16)
    grad = sparse_grads(1)[0].to(BF16)
    table = start.clone().to(dev)
    exact = start.float().clone()  # the fp32 rule on the same bf16 inputs, no rounding
    if rule == "lazy_adam":
        m, v = torch.zeros_like(table), torch.zeros_like(table)
        adam_step(backend, table, grad.to(dev), m, v, seed=3, lr=0.05, wd=0.1)
        em, ev = torch.zeros_like(exact), torch.zeros_like(exact)
        row_optim.lazy_adam_rows(exact, grad.float(), em, ev, lr=0.05, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                 weight_decay=0.1, step=1, backend="reference")
        assert_neighbour(m.cpu()[READS], em[READS])
        assert_neighbour(v.cpu()[READS], ev[READS])
    else:
        acc = torch.zeros(12, device=dev)
        row_optim.rowwise_adagrad_rows(table, grad.to(dev), acc, lr=0.05, eps=EPS, weight_decay=0.1, rounding_seed=3,
                                       backend=backend)
        row_optim.rowwise_adagrad_rows(exact, grad.float(), torch.zeros(12), lr=0.05, eps=EPS, weight_decay=0.1,
                                       backend="reference")
    table = table.cpu()
    assert_neighbour(table[READS], exact[READS])
    assert torch.equal(table[UNREAD], start[UNREAD])


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("moments", [BF16, torch.float32])
def test_every_row_adamw_steps_unread_rows_and_rounds_only_bf16_stores(moments, backend):
    """every_row (the presets' AdamW over a bf16 table): unread rows are stepped too (weight decay, the moments'
    momentum), each bf16 write is a neighbour of the exact fp32 update, fp32 moments are stored unrounded, and being
    told which rows' gradient is zero (nonzero_rows: not read) changes no bit."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(4)
    start = torch.randn(N, D, generator=g).to(BF16)
    m0, v0 = torch.randn(N, D, generator=g) * 0.01, torch.rand(N, D, generator=g) * 1e-4
    m0, v0 = m0.to(moments).float(), v0.to(moments).float()  # representable in either dtype
    grad = sparse_grads(1)[0].to(BF16)
    scale = 1.5
    kw = dict(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, step=3, every_row=True)
    exact, em, ev = start.float(), m0.clone(), v0.clone()  # the fp32 rule, no rounding
    row_optim.lazy_adam_rows(exact, grad.float() / scale, em, ev, backend="reference", **kw)
    outs = []
    for told in (False, True):
        table, m, v = (t.to(dev, copy=True) for t in (start, m0.to(moments), v0.to(moments)))
        nonzero = (grad != 0).any(dim=1).to(dev) if told else None
        row_optim.lazy_adam_rows(table, grad.to(dev), m, v, rounding_seed=7, nonzero_rows=nonzero,
                                 grad_scale=torch.tensor(scale, device=dev), backend=backend, **kw)
        outs.append([t.cpu() for t in (table, m, v)])
    table, m, v = outs[0]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert_neighbour(table, exact)
    assert (table[UNREAD] != start[UNREAD]).any(dim=1).all()  # every unread row moved
    if moments == BF16:
        assert_neighbour(m, em)
        assert_neighbour(v, ev)
    else:
        assert m.dtype == v.dtype == torch.float32
        # (a GPU contracts to FMAs and divides approximately: a few ulps of moments near 1e-2, some of which cancel)
        torch.testing.assert_close(m, em, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(v, ev, rtol=1e-6, atol=1e-8)


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_random_bits_follow_seed_row_and_global_column(backend):
    """Same seed: the same table, also when the update runs on a column slice told its first column (a shard, or
    a replica of one); another seed: another table."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(2)
    start = torch.randn(8, 64, generator=g).to(BF16).to(dev)
    grad = torch.randn(8, 64, generator=g).to(BF16).to(dev)

    def run_on(cols, seed):
        table = start[:, cols].clone()
        m, v = torch.zeros_like(table), torch.zeros_like(table)
        adam_step(backend, table, grad[:, cols].contiguous(), m, v, seed=seed, lr=1e-3, col0=cols.start)
        return table.cpu()

    whole = run_on(slice(0, 64), 5)
    assert torch.equal(run_on(slice(0, 64), 5), whole)
    assert torch.equal(torch.cat([run_on(slice(0, 32), 5), run_on(slice(32, 64), 5)], dim=1), whole)
    assert not torch.equal(run_on(slice(0, 64), 6), whole)


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("seed, col0", [(0, 0), (5, 0), (2**31 - 2, 96), (123456789, 1023)])
def test_kernel_bits_equal_the_reference_bits(seed, col0):
    """The Triton kernels' draws are the reference's (random_bits16), bit for bit, for every stream; and they look
    uniform: each of the 16 bits is set about half of the time."""
    from ops import triton_row_optim

    dev = device_of("triton")
    n_rows, n_cols = 64, 48
    got = triton_row_optim.random_bits(seed, n_rows, n_cols, col0, device=dev).cpu()
    rows, cols = torch.arange(n_rows), torch.arange(col0, col0 + n_cols)
    for stream in range(3):
        assert torch.equal(got[stream], row_optim.random_bits16(seed, rows, cols, stream)), f"stream {stream}"
    for stream in range(3):
        bits = (got[stream][..., None] >> torch.arange(16)) & 1
        assert (bits.float().mean(dim=(0, 1)) - 0.5).abs().max() < 0.05  # 3072 draws per bit: std 0.009
    # the streams are not copies of one another
    assert not torch.equal(got[0], got[1]) and not torch.equal(got[0], got[2])


def test_stochastic_rounding_needs_a_bf16_table_without_master():
    with pytest.raises(ValueError, match="bf16 table without a master"):
        row_optim.lazy_adam_rows(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), lr=1e-3,
                                 beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1, rounding_seed=1)


# ------------------------------------------------------------------------------------------ the optimizer object
@pytest.mark.parametrize("value_optimizer", ["adamw", "rowwise_adagrad"])
def test_state_is_bf16_without_master_and_the_model_trains(value_optimizer):
    cfg, rt, model = tiny("model.memory.value_dtype=bfloat16", "optim.value_precision=bf16_stochastic",
                          f"optim.value_optimizer={value_optimizer}")
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    before = model.values.weight.detach().clone()
    first = None
    for _ in range(4):
        loss, _ = train_step(model, opt, sched, [batch], cfg, rt)
        first = float(loss) if first is None else first
    assert float(loss) < first
    state = opt.state[model.values.weight]
    assert "master" not in state and model.values.weight.dtype == BF16
    assert not torch.equal(model.values.weight.detach(), before)
    n = model.values.weight.numel()
    if value_optimizer == "adamw":
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == BF16
        assert optimizer_state_bytes(opt)["values"] == 4 * n + 4  # two bf16 moments (+ the step counter)
    else:
        assert optimizer_state_bytes(opt)["values"] == 4 * model.values.weight.shape[0] + 4


def test_fp32_table_with_stochastic_rounding_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"optim.value_precision.*model.memory.value_dtype=bfloat16"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + ["optim.value_precision=bf16_stochastic"])
    with pytest.raises(ConfigError, match=r"optim.value_precision"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + ["optim.value_precision=fp16"])


STOCHASTIC = ["model.memory.value_dtype=bfloat16", "optim.value_precision=bf16_stochastic"]


def test_same_seed_same_losses(tmp_path):
    """The rounding bits come from the step count: a second run equals the first exactly (resume: the bf16 resume
    test of tests/test_train_value_master.py)."""
    run(config(tmp_path / "a", "train.steps=6", "checkpoint.every=0", *STOCHASTIC))
    run(config(tmp_path / "b", "train.steps=6", "checkpoint.every=0", *STOCHASTIC))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_refuses_to_switch_precision(tmp_path):
    """The optimizer state of the other precision would not fit: refused by name before any step, checkpoint kept."""
    d = tmp_path / "run"
    run(config(d, "train.steps=2", "checkpoint.every=2", "model.memory.value_dtype=bfloat16"))
    with pytest.raises(ConfigError, match=r"optim.value_precision.*fp32_master.*bf16_stochastic"):
        run(config(d, "train.steps=4", "checkpoint.every=2", *STOCHASTIC))
    assert (d / "checkpoints" / "step_2").is_dir()


@pytest.mark.gpu
def test_kernel_on_gpu_is_unbiased_and_leaves_unread_rows():
    n, d, spacing = 4096, 1024, 2.0 ** -8
    table = torch.ones(n, d, dtype=BF16, device="cuda")
    grad = torch.zeros(n, d, dtype=BF16, device="cuda")
    grad[: n // 2] = 1.0
    m, v = torch.zeros_like(table), torch.zeros_like(table)
    row_optim.lazy_adam_rows(table, grad, m, v, lr=spacing / 4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                             step=1, rounding_seed=123)
    read = table[: n // 2].float()
    assert abs((read < 1).float().mean().item() - 0.25) < 0.005
    assert torch.equal(table[n // 2:], torch.ones_like(table[n // 2:]))
    # compiled for the GPU, the kernels draw the reference's bits
    from ops import triton_row_optim

    rows, cols = torch.arange(n), torch.arange(512, 512 + d)
    got = triton_row_optim.random_bits(77, n, d, 512).cpu()
    for stream in range(3):
        assert torch.equal(got[stream], row_optim.random_bits16(77, rows, cols, stream)), f"stream {stream}"
