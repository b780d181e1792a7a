"""A value table stored in bf16 (model.memory.value_dtype=bfloat16) with fp32 master weights in the value optimizer.

Each rule (lazy Adam, row-wise Adagrad, AdamW = lazy Adam over every row) on a bf16 table with a bf16 gradient must
update its fp32 master as the fp32 rule would, write the table as the master rounded, and leave unread rows
bit-identical; both backends (the Triton kernel interpreted on CPU). Then the model, the optimizer's state, resume
and loading a bf16 checkpoint for evaluation.
"""
import os
import shutil

import pytest
import torch

from _train_helpers import STEP_SMALL
from ops import row_optim
from test_train_loop import config, losses
from test_train_value_optim import BETAS, EPS, LR, READS, UNREAD, WD, D, N, device_of, sparse_grads
from train.builder import build_model
from train.config import load_config
from train.loop import run
from train.optim import build_optimizer, build_scheduler
from train.runtime import setup_runtime
from train.step import train_step
from train.value_optim import RowSparseValueAdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = torch.bfloat16


def step_rule(rule, param, grad, state, step, backend, master=None, row_stat=None):
    if rule == "lazy_adam":
        row_optim.lazy_adam_rows(param, grad, *state, row_stat, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                 weight_decay=WD, step=step, master=master, backend=backend)
    else:
        row_optim.rowwise_adagrad_rows(param, grad, *state, row_stat, lr=LR, eps=EPS, weight_decay=WD, master=master,
                                       backend=backend)


def fresh_state(rule, dev):
    return [torch.zeros(N, D, device=dev), torch.zeros(N, D, device=dev)] if rule == "lazy_adam" else \
        [torch.zeros(N, device=dev)]


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rule", ["lazy_adam", "rowwise_adagrad"])
def test_master_update_equals_fp32_rule_and_table_is_its_rounding(rule, backend):
    dev = device_of(backend)
    start = torch.randn(N, D, generator=torch.Generator().manual_seed(1)).to(BF16)
    grads = [g.to(BF16) for g in sparse_grads(4)]
    table, master, state = start.clone().to(dev), start.float().to(dev), fresh_state(rule, dev)
    ref, ref_state = start.float().to(dev), fresh_state(rule, dev)  # the fp32 rule on the same start and gradients
    for step, grad in enumerate(grads, 1):
        step_rule(rule, table, grad.to(dev), state, step, backend, master=master)
        step_rule(rule, ref, grad.float().to(dev), ref_state, step, "reference")
    table, master = table.cpu(), master.cpu()
    assert table.dtype == BF16 and master.dtype == torch.float32
    torch.testing.assert_close(master, ref.cpu(), rtol=1e-6, atol=1e-7)
    for s, r in zip(state, ref_state):
        torch.testing.assert_close(s.cpu(), r.cpu(), rtol=1e-6, atol=1e-7)
    assert torch.equal(table, master.to(BF16))  # rounded to nearest even, interpreted kernel included
    assert torch.equal(table[UNREAD], start[UNREAD]) and torch.equal(master[UNREAD], start[UNREAD].float())
    # the master keeps what bf16 cannot: some read rows moved by less than the table's rounding shows
    assert (master[READS] != start[READS].float()).all()


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_master_with_a_column_shard_row_statistic(backend):
    """Row-wise Adagrad on a bf16 column shard follows the full row's statistic, as the fp32 shard does."""
    dev = device_of(backend)
    start = torch.randn(N, D, generator=torch.Generator().manual_seed(2)).to(BF16)
    grad = sparse_grads(1)[0].to(BF16)
    stat = row_optim.touched_stat("rowwise_adagrad", grad)
    stat[0] = 1.0  # read on another shard only: its accumulator grows, its weight decays
    table, master, acc = start.clone().to(dev), start.float().to(dev), torch.zeros(N, device=dev)
    ref, ref_acc = start.float(), torch.zeros(N)
    step_rule("rowwise_adagrad", table, grad.to(dev), [acc], 1, backend, master=master, row_stat=stat.to(dev))
    step_rule("rowwise_adagrad", ref, grad.float(), [ref_acc], 1, "reference", row_stat=stat)
    torch.testing.assert_close(master.cpu(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(acc.cpu(), ref_acc)
    assert acc[0] > 0 and (master[0].cpu() != start[0].float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["lazy_adam", "rowwise_adagrad"])
def test_master_kernel_on_gpu_matches_reference(rule):
    g = torch.Generator().manual_seed(3)
    n, d = 4096, 1024
    start = torch.randn(n, d, generator=g).to(BF16).cuda()
    grad = torch.zeros(n, d, device="cuda", dtype=BF16)
    rows = torch.randint(0, n, (3000,), generator=g).cuda()
    grad.index_add_(0, rows, torch.randn(3000, d, generator=g).to(BF16).cuda())
    out = {}
    for backend in ("triton", "reference"):
        table, master = start.clone(), start.float()
        state = [torch.zeros(n, d, device="cuda"), torch.zeros(n, d, device="cuda")] if rule == "lazy_adam" else \
            [torch.zeros(n, device="cuda")]
        for step in (1, 2):
            step_rule(rule, table, grad, state, step, backend, master=master)
        out[backend] = table, master
    torch.testing.assert_close(out["triton"][1], out["reference"][1], rtol=1e-5, atol=1e-6)
    assert torch.equal(out["triton"][0], out["triton"][1].to(BF16))
    untouched = (grad == 0).all(dim=1)
    assert torch.equal(out["triton"][0][untouched], start[untouched])


# ------------------------------------------------------------------------------------------ the optimizer object
def test_adamw_on_a_bf16_table_is_adamw_on_its_master():
    g = torch.Generator().manual_seed(4)
    start = torch.randn(N, D, generator=g).to(BF16)
    values = torch.nn.Parameter(start.clone())
    ref = torch.nn.Parameter(start.float())
    opt = RowSparseValueAdamW([dict(params=[values], name="values", lr=LR, weight_decay=WD)], "adamw",
                              betas=BETAS, eps=EPS)
    ref_opt = torch.optim.AdamW([dict(params=[ref], lr=LR, weight_decay=WD)], betas=BETAS, eps=EPS)
    for grad in sparse_grads(3):
        values.grad, ref.grad = grad.to(BF16), grad.to(BF16).float()
        opt.step()
        ref_opt.step()
    state = opt.state[values]
    assert state["master"].dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(state["master"], ref.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(values.detach(), state["master"].to(BF16))
    assert (state["master"][UNREAD] != start[UNREAD].float()).all()  # AdamW decays every row, read or not


def tiny(*extra):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + list(extra))
    rt = setup_runtime(cfg)
    return cfg, rt, build_model(cfg, rt)


def test_bf16_table_is_the_rounded_fp32_table_and_trains():
    _, _, fp32_model = tiny()
    cfg, rt, model = tiny("model.memory.value_dtype=bfloat16")
    assert model.values.weight.dtype == BF16
    assert torch.equal(model.values.weight, fp32_model.values.weight.to(BF16))  # same seed, same draws
    opt = build_optimizer(model, cfg.optim)
    assert type(opt) is RowSparseValueAdamW  # adamw (the default) on a bf16 table needs the master
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    model(batch[:, :-1], targets=batch[:, 1:]).backward()
    assert model.values.weight.grad.dtype == BF16  # (train_step ends with the gradients set to None)
    model.zero_grad(set_to_none=True)
    first = None
    for _ in range(4):
        loss, _ = train_step(model, opt, sched, [batch], cfg, rt)
        first = float(loss) if first is None else first
    assert float(loss) < first
    master = opt.state[model.values.weight]["master"]
    assert torch.equal(model.values.weight.detach(), master.to(BF16))


def test_master_is_made_from_the_weights_present_at_the_first_step():
    """Weights loaded before training (checkpoint.init_from) seed the master; the build-time table does not."""
    cfg, rt, model = tiny("model.memory.value_dtype=bfloat16", "optim.value_optimizer=rowwise_adagrad")
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    built = model.values.weight.detach().float()
    loaded = torch.randn(model.values.weight.shape, generator=torch.Generator().manual_seed(5)).to(BF16)
    with torch.no_grad():
        model.values.weight.copy_(loaded)  # as a weight load does
    batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    train_step(model, opt, sched, [batch], cfg, rt)
    master = opt.state[model.values.weight]["master"]
    # one Adagrad step moves a weight by about the (warmup) rate; the loaded and built tables differ by O(1)
    assert (master - loaded.float()).abs().max() < 0.1 < (master - built).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("value_optimizer, precision", [("adamw", "fp32_master"), ("rowwise_adagrad", "fp32_master"),
                                                        ("adamw", "bf16_stochastic")])
def test_resume_with_bf16_table_continues_exactly(tmp_path, value_optimizer, precision):
    """The master lives in the optimizer state: saved and loaded with it, so a resume equals the uninterrupted run
    (a master remade from the bf16 table would lose its low bits and drift). Stochastic rounding draws its bits
    from the step count, which is saved too."""
    opt = [f"optim.value_optimizer={value_optimizer}", "model.memory.value_dtype=bfloat16",
           f"optim.value_precision={precision}"]
    run(config(tmp_path / "full", "train.steps=12", "checkpoint.every=0", *opt))
    ref = losses(tmp_path / "full")
    interrupted = tmp_path / "interrupted"
    run(config(interrupted, "train.steps=12", "checkpoint.every=6", *opt))
    shutil.rmtree(interrupted / "checkpoints" / "step_12")  # as if the job died after step 6's checkpoint
    run(config(interrupted, "train.steps=12", "checkpoint.every=6", *opt))
    resumed = losses(interrupted)
    assert [resumed[s] for s in range(7, 13)] == [ref[s] for s in range(7, 13)]  # bit-exact


def test_bf16_checkpoint_loads_for_evaluation_and_export(tmp_path):
    from model.checkpoint import load_model
    from train.weights import export_checkpoint

    run(config(tmp_path / "run", "train.steps=2", "checkpoint.every=2", "model.memory.value_dtype=bfloat16"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    model, cfg = load_model(str(ckpt))
    assert cfg.memory.value_dtype == "bfloat16" and model.values.weight.dtype == BF16
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        logits = model(tokens)
    assert torch.isfinite(logits).all()
    out = export_checkpoint(str(ckpt), str(tmp_path / "export"))
    exported, _ = load_model(str(out))
    assert torch.equal(exported.values.weight, model.values.weight)


# ------------------------------------------------------------------------------------------ clip factor in the step
@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rule", ["lazy_adam", "rowwise_adagrad"])
@pytest.mark.parametrize("bf16", [False, True])
def test_grad_scale_divides_the_gradient(rule, backend, bf16):
    """grad_scale s (a device scalar) on gradient g steps as g / s would: the clip factor needs no pass of its own.
    The factor changes every step, as a clip factor does (Adam is blind to a constant one)."""
    dev = device_of(backend)
    start = torch.randn(N, D, generator=torch.Generator().manual_seed(6))
    dtype = BF16 if bf16 else torch.float32
    scales = [3.0, 1.5, 6.0]
    out = []
    for scaled in (True, False):
        table = start.to(dtype).to(dev, copy=True)
        master = table.float() if bf16 else None
        state = fresh_state(rule, dev)
        for step, grad in enumerate(sparse_grads(3), 1):
            grad = grad.to(dev)
            kw = dict(lr=LR, eps=EPS, weight_decay=WD, master=master, backend=backend)
            s = scales[step - 1]
            g, extra = (grad, dict(grad_scale=torch.tensor(s, device=dev))) if scaled else (grad / s, {})
            if rule == "lazy_adam":
                row_optim.lazy_adam_rows(table, g, *state, beta1=BETAS[0], beta2=BETAS[1], step=step, **kw, **extra)
            else:
                row_optim.rowwise_adagrad_rows(table, g, *state, **kw, **extra)
        out.append((master if bf16 else table).cpu())
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)
    assert not torch.equal(out[0], start)


@pytest.mark.parametrize("choice", ["sparse_adam", "rowwise_adagrad"])
def test_optimizer_grad_scale_reaches_the_value_rows(choice):
    """optimizer.grad_scale, which torch's fused AdamW divides the other groups' gradients by, divides the value
    table's gradient too. The factor changes every step, as a clip factor does (Adam is blind to a constant one)."""
    from test_train_value_optim import groups, two_group_params

    out = []
    for scaled in (True, False):
        dense, values = two_group_params()
        opt = RowSparseValueAdamW(groups(dense, values), choice, betas=BETAS, eps=EPS, fused=True)
        for s, grad in zip([4.0, 1.5, 6.0], sparse_grads(3)):
            if scaled:
                opt.grad_scale = torch.tensor(s)
            dense.grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(int(s * 2))) / (1 if scaled else s)
            values.grad = grad / (1 if scaled else s)
            opt.step()
        out.append((dense.detach().clone(), values.detach().clone()))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("value_optimizer, precision", [("adamw", "fp32_master"), ("rowwise_adagrad", "fp32_master"),
                                                        ("adamw", "bf16_stochastic")])
def test_bf16_table_with_master_on_column_shards(value_optimizer, precision):
    """A bf16 table split by columns (MP = 2): each rank's master is its column slice (a DTensor like the table) and
    the shards together equal the single process (which uses the same autograd gradient sum here). Without a master
    (stochastic rounding) each shard draws the random bits of its global columns: the same table again."""
    from test_train_distributed import assert_same, reference, run_distributed

    opt = [f"optim.value_optimizer={value_optimizer}", "model.memory.value_dtype=bfloat16",
           "model.memory.accumulate_value_grad=false", f"optim.value_precision={precision}"]
    got, ref = run_distributed(2, ["dist.memory_parallel=2"] + opt), reference(2, overrides=opt)
    if precision == "fp32_master":
        assert_same(got, ref)
        return
    # Rounding-level differences of the two layouts' gradients flip a rounding decision now and then, and the model
    # follows: the table must still agree element for element nearly everywhere (a shard drawing another column's
    # bits, e.g. from a wrong first column, disagrees on a large share of the half it holds).
    values, ref_values = got[1].pop("values.weight"), ref[1].pop("values.weight")
    differ = (values != ref_values).float().mean().item()
    assert differ < 0.02  # measured 0.0015; 0.18 with every shard drawing from column 0
    assert_same(got, ref, atol=1e-3)


@pytest.mark.slow
def test_bf16_table_gradient_summed_over_replicas():
    """MP = 1 on 2 ranks: the whole bf16 table on each rank, its gradient summed over the two replicas (in fp32,
    rounded once) equals the single process over both ranks' batches."""
    from test_train_distributed import assert_same, reference, run_distributed

    opt = ["model.memory.value_dtype=bfloat16", "model.memory.accumulate_value_grad=false"]
    (losses, params), (ref_losses, ref_params) = run_distributed(2, ["dist.memory_parallel=1"] + opt), reference(
        2, overrides=opt)
    # the bf16 table itself: within one bf16 rounding (the replicas' sum rounds once, the single process per add)
    torch.testing.assert_close(params.pop("values.weight"), ref_params.pop("values.weight"), rtol=2**-7, atol=1e-6)
    assert_same((losses, params), (ref_losses, ref_params))


def test_bad_value_dtype_is_rejected_by_name():
    from train.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.memory.value_dtype.*float16"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + ["model.memory.value_dtype=float16"])
