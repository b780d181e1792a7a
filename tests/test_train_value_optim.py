"""Row-sparse value optimizers (optim.value_optimizer): sparse_adam (lazy Adam) and rowwise_adagrad.

Each rule against a plain per-row loop written here from its definition, on random tables whose gradients come
from reads with duplicates (rows read twice) and rows never read; both backends (the torch reference and the
Triton kernel, interpreted on CPU). Then the optimizer object: AdamW for the other groups, one schedule, state size,
training, config errors.
"""
import os

import pytest
import torch

from _train_helpers import STEP_SMALL
from ops import row_optim
from train.adamw import AdamW
from train.config import ConfigError, load_config
from train.builder import build_model
from train.step import train_step
from train.optim import build_optimizer, build_scheduler
from train.runtime import setup_runtime
from train.value_optim import RowSparseValueAdamW, optimizer_state_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, D = 12, 6
READS = torch.tensor([1, 3, 3, 7, 1, 10, 3])  # rows 1 and 3 read more than once; 0, 2, 4-6, 8, 9, 11 never
UNREAD = [r for r in range(N) if r not in READS.tolist()]
LR, BETAS, EPS, WD = 0.05, (0.9, 0.95), 1e-8, 0.1


def sparse_grads(steps: int, seed: int = 0):
    """Dense [N, D] gradients of a lookup: index_add of one random row per read, so duplicates accumulate."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grad = torch.zeros(N, D)
        grad.index_add_(0, READS, torch.randn(len(READS), D, generator=g))
        out.append(grad)
    return out


def lazy_adam_loop(table, grads):
    """Adam with decoupled decay, per row, skipping rows whose gradient row is zero; bias correction by call count."""
    p, m, v = table.clone().double(), torch.zeros(N, D).double(), torch.zeros(N, D).double()
    b1, b2 = BETAS
    for step, grad in enumerate(grads, 1):
        for r in range(N):
            g = grad[r].double()
            if not g.abs().max() > 0:
                continue
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * g * g
            p[r] = p[r] * (1 - LR * WD) - LR * (m[r] / (1 - b1 ** step)) / ((v[r] / (1 - b2 ** step)).sqrt() + EPS)
    return p.float()


def rowwise_adagrad_loop(table, grads):
    p, acc = table.clone().double(), torch.zeros(N).double()
    for grad in grads:
        for r in range(N):
            g = grad[r].double()
            if not g.abs().max() > 0:
                continue
            acc[r] += (g * g).mean()
            p[r] = p[r] * (1 - LR * WD) - LR * g / (acc[r].sqrt() + EPS)
    return p.float()


def device_of(backend):
    """The Triton kernel runs on CUDA tensors, or on CPU ones under TRITON_INTERPRET when there is no GPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def run_rows(rule, backend, table, grads):
    dev = device_of(backend)
    p = table.clone().to(dev)
    state = [torch.zeros(N, D, device=dev), torch.zeros(N, D, device=dev)] if rule == "lazy_adam" else \
        [torch.zeros(N, device=dev)]
    for step, grad in enumerate(grads, 1):
        grad = grad.to(dev)
        if rule == "lazy_adam":
            row_optim.lazy_adam_rows(p, grad, *state, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD,
                                     step=step, backend=backend)
        else:
            row_optim.rowwise_adagrad_rows(p, grad, *state, lr=LR, eps=EPS, weight_decay=WD, backend=backend)
    return p.cpu(), [s.cpu() for s in state]


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rule, loop", [("lazy_adam", lazy_adam_loop), ("rowwise_adagrad", rowwise_adagrad_loop)])
def test_rule_matches_plain_loop_and_leaves_unread_rows_alone(rule, loop, backend):
    table = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    grads = sparse_grads(4)
    p, state = run_rows(rule, backend, table, grads)
    torch.testing.assert_close(p, loop(table, grads), rtol=1e-5, atol=1e-6)
    assert torch.equal(p[UNREAD], table[UNREAD])  # bit-identical, weight decay included
    assert (p[READS] != table[READS]).all()
    for s in state:
        assert not s[UNREAD].any()


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rule", ["lazy_adam", "rowwise_adagrad"])
def test_given_row_statistic_decides_touched_rows(rule, backend):
    """A column shard follows the full row's statistic: a row whose local slice has zero gradient still moves
    (Adam's moments decay, Adagrad's accumulator grows) when another shard saw it, and vice versa."""
    dev = device_of(backend)
    table = torch.randn(N, D, generator=torch.Generator().manual_seed(2)).to(dev)
    grad = sparse_grads(1)[0].to(dev)
    stat = row_optim.touched_stat(rule, grad)
    stat[0] = 1.0  # read by another shard only
    stat[1] = 0.0  # read here but vetoed: no shard may diverge from the others
    p = table.clone()
    state = [torch.ones(N, D, device=dev), torch.ones(N, D, device=dev)] if rule == "lazy_adam" else \
        [torch.ones(N, device=dev)]
    if rule == "lazy_adam":
        row_optim.lazy_adam_rows(p, grad, *state, stat, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                 weight_decay=WD, step=2, backend=backend)
    else:
        row_optim.rowwise_adagrad_rows(p, grad, *state, stat, lr=LR, eps=EPS, weight_decay=WD, n_cols=4 * D,
                                       backend=backend)
        expect = 1 + stat[3] / (4 * D)  # the full row's mean square: n_cols is the full width
        torch.testing.assert_close(state[0][3], expect)
    assert (p[0] != table[0]).all() and (state[0][0] != 1).all()
    assert torch.equal(p[1], table[1]) and (state[0][1] == 1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("given_stat", [False, True])
def test_adagrad_kernel_reads_each_rows_accumulator_once_on_gpu(given_stat):
    """Each warp of a row's program reads the row's accumulator and one thread writes it back: a warp that read
    after the write would add the row's statistic twice and take a smaller step on its part of the row. Many
    rows, every one touched, several steps, so a missing barrier between the read and the write shows."""
    g = torch.Generator().manual_seed(5)
    n, d = 8192, 1024
    start = torch.randn(n, d, generator=g).cuda()
    out = {}
    for backend in ("triton", "reference"):
        p, acc = start.clone(), torch.zeros(n, device="cuda")
        for step in range(6):
            grad = torch.randn(n, d, generator=torch.Generator().manual_seed(10 + step)).cuda()
            stat = row_optim.touched_stat("rowwise_adagrad", grad) if given_stat else None
            row_optim.rowwise_adagrad_rows(p, grad, acc, stat, lr=LR, eps=EPS, weight_decay=WD, backend=backend)
        out[backend] = p, acc
    torch.testing.assert_close(out["triton"][1], out["reference"][1], rtol=1e-5, atol=0)
    torch.testing.assert_close(out["triton"][0], out["reference"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.any_device  # the Triton backend's tensors on the GPU when there is one
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rule, every_row", [("lazy_adam", False), ("lazy_adam", True), ("rowwise_adagrad", False)])
def test_rows_known_to_be_zero_are_not_read(rule, every_row, backend):
    """nonzero_rows: a gradient row flagged False is taken as zero. With the real gradient (zero there) the step is
    the one without flags, bit for bit; with garbage written on those rows it still is, so they were never read."""
    dev = device_of(backend)
    table = torch.randn(N, D, generator=torch.Generator().manual_seed(4)).to(dev)
    grad = sparse_grads(1)[0].to(dev)
    nonzero = torch.zeros(N, dtype=torch.bool, device=dev)
    nonzero[READS] = True
    nonzero[0] = True  # flagged, yet its gradient is zero: "may be non-zero"
    poisoned = grad.clone()
    poisoned[~nonzero] = 1e3
    stat = torch.ones(N, device=dev) if every_row else None  # every row counted as touched: AdamW

    def step(g, rows):
        p = table.clone()
        state = [torch.full((N, D), 0.5, device=dev), torch.full((N, D), 0.25, device=dev)] if rule == "lazy_adam" \
            else [torch.full((N,), 0.5, device=dev)]
        kw = dict(lr=LR, eps=EPS, weight_decay=WD, grad_scale=torch.tensor(2.0, device=dev), nonzero_rows=rows,
                  backend=backend)
        if rule == "lazy_adam":
            row_optim.lazy_adam_rows(p, g, *state, stat, beta1=BETAS[0], beta2=BETAS[1], step=3, **kw)
        else:
            row_optim.rowwise_adagrad_rows(p, g, *state, stat, **kw)
        return [p.cpu()] + [s.cpu() for s in state]

    want = step(grad, None)
    for got in (step(grad, nonzero), step(poisoned, nonzero)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(step(poisoned, None)[0], want[0])  # read, the garbage would show
    if every_row:  # every row moves, the untouched ones by their moments and weight decay
        assert (want[0] != table.cpu()).all()
    with pytest.raises(ValueError, match="nonzero_rows must be a bool tensor of one entry per table row"):
        step(grad, nonzero.float())


# ------------------------------------------------------------------------------------------ the optimizer object
def two_group_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.nn.Parameter(torch.randn(5, 4, generator=g))
    values = torch.nn.Parameter(torch.randn(N, D, generator=g))
    return dense, values


def groups(dense, values):
    return [dict(params=[dense], name="decay", lr=0.01, weight_decay=0.1),
            dict(params=[values], name="values", lr=LR, weight_decay=WD)]


def test_sparse_adam_is_adamw_when_every_row_is_read():
    """Every row read every step: lazy Adam is AdamW, bit for bit, under one LambdaLR over both groups."""
    runs = []
    for make in (lambda gs: torch.optim.AdamW(gs, betas=BETAS, eps=EPS),
                 lambda gs: RowSparseValueAdamW(gs, "sparse_adam", betas=BETAS, eps=EPS)):
        dense, values = two_group_params()
        opt = make(groups(dense, values))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        g = torch.Generator().manual_seed(3)
        for _ in range(4):
            dense.grad, values.grad = torch.randn(5, 4, generator=g), torch.randn(N, D, generator=g)
            opt.step()
            sched.step()
        runs.append((dense.detach().clone(), values.detach().clone(), [x["lr"] for x in opt.param_groups]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]


# fused: the GPU trainer's setting (torch's fused AdamW also runs on CPU)
@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("choice", ["sparse_adam", "rowwise_adagrad"])
def test_optimizer_steps_dense_groups_with_adamw_and_values_sparsely(choice, fused):
    dense, values = two_group_params()
    ref_dense, _ = two_group_params()
    opt = RowSparseValueAdamW(groups(dense, values), choice, betas=BETAS, eps=EPS, fused=fused)
    ref = torch.optim.AdamW(groups(ref_dense, torch.nn.Parameter(torch.zeros(N, D))), betas=BETAS, eps=EPS,
                            fused=fused)
    table = values.detach().clone()
    for grad in sparse_grads(3):
        dense.grad = ref_dense.grad = torch.ones(5, 4)
        values.grad = grad
        opt.step()
        ref.step()
    assert torch.equal(dense, ref_dense)
    loop = lazy_adam_loop if choice == "sparse_adam" else rowwise_adagrad_loop
    torch.testing.assert_close(values.detach(), loop(table, sparse_grads(3)), rtol=1e-5, atol=1e-6)
    assert torch.equal(values[UNREAD], table[UNREAD])


def tiny(*extra):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + list(extra))
    rt = setup_runtime(cfg)
    return cfg, rt, build_model(cfg, rt)


@pytest.mark.parametrize("choice, value_floats", [("adamw", lambda n, d: 2 * n * d), ("sparse_adam", lambda n, d: 2 * n * d),
                                                  ("rowwise_adagrad", lambda n, d: n)])
def test_value_state_size(choice, value_floats):
    cfg, rt, model = tiny(f"optim.value_optimizer={choice}")
    opt = build_optimizer(model, cfg.optim)
    assert type(opt) is (AdamW if choice == "adamw" else RowSparseValueAdamW)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    train_step(model, opt, sched, [batch], cfg, rt)
    n, d = model.values.weight.shape
    step_bytes = 4  # AdamW's and ours: one fp32 step count per parameter
    assert optimizer_state_bytes(opt)["values"] == 4 * value_floats(n, d) + step_bytes
    dense = [p for g in opt.param_groups if g["name"] != "values" for p in g["params"]]
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in dense)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["sparse_adam", "rowwise_adagrad"])
def test_short_training_run_learns(choice):
    """A repeated batch: the loss falls, the scheduler drives the value group's rate, only read rows move."""
    cfg, rt, model = tiny(f"optim.value_optimizer={choice}", "train.steps=8", "model.memory.n_keys=16",
                          "optim.value_weight_decay=0.1")
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    table = model.values.weight.detach().clone()
    read = torch.zeros(table.shape[0], dtype=torch.bool)

    def record_reads(grad):
        read.logical_or_((grad != 0).any(dim=1))

    model.values.weight.register_hook(record_reads)
    losses, value_lrs = [], []
    for _ in range(cfg.train.steps):
        value_lrs.append(next(g["lr"] for g in opt.param_groups if g["name"] == "values"))  # this step's rate
        loss, _ = train_step(model, opt, sched, [batch], cfg, rt)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5
    assert value_lrs[0] < value_lrs[1] and value_lrs[-1] < max(value_lrs)  # warmup, then cosine
    moved = (model.values.weight.detach() != table).any(dim=1)
    assert 0 < read.sum() < table.shape[0]  # 16 * 16 rows: some never read
    assert torch.equal(moved, read)


@pytest.mark.parametrize("choice, rule", [("adamw", "lazy_adam_rows"), ("sparse_adam", "lazy_adam_rows"),
                                          ("rowwise_adagrad", "rowwise_adagrad_rows")])
def test_sparse_value_steps_skip_rows_the_merged_pass_left_zero(choice, rule, monkeypatch):
    """A bf16 table whose gradient the lookups' merged pass wrote, clipped inside the optimizer (a clip that scales
    .grad in place makes the pass's record unknown): a sparse rule is told which rows no pair touched
    (ops.grad_nonzero_rows) and moves the table exactly as it does without being told; so is every-row AdamW."""
    import ops

    flags = []
    real = getattr(row_optim, rule)

    def spy(*args, **kw):
        flags.append(kw.get("nonzero_rows"))
        return real(*args, **kw)

    monkeypatch.setattr(row_optim, rule, spy)
    tables = []
    for told in (True, False):
        if not told:
            monkeypatch.setattr(ops, "grad_nonzero_rows", lambda table: None)
        cfg, rt, model = tiny(f"optim.value_optimizer={choice}", "model.memory.value_dtype=bfloat16",
                              "model.memory.n_keys=16", "optim.clip_in_optimizer=true")
        opt = build_optimizer(model, cfg.optim)
        assert isinstance(opt, RowSparseValueAdamW)
        sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=gen)
            train_step(model, opt, sched, [batch], cfg, rt)
        tables.append(model.values.weight.detach().clone())
    told_flags, untold_flags = flags[:3], flags[3:]
    assert len(untold_flags) == 3 and all(f is None for f in untold_flags)
    n_rows = tables[0].shape[0]
    assert all(f is not None and 0 < int(f.sum()) < n_rows for f in told_flags)  # 16 * 16 rows: some never read
    assert torch.equal(tables[0], tables[1])


def test_bad_value_optimizer_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"optim.value_optimizer.*'adamw', 'sparse_adam', 'rowwise_adagrad'"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), STEP_SMALL + ["optim.value_optimizer=lazy"])
