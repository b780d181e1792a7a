"""Lookups that add their value gradient into the table's .grad (ops.memory_lookup_into_grad) against autograd's
per-layer gradients and their sum: 1-3 layers sharing a table, rows read several times and rows never read, both
backends (the Triton kernel interpreted on CPU), fp32 (bit-identical: the same additions) and bf16 (one rounding
per row instead of one per layer and one per add)."""
import pytest
import torch

import ops
from model import MemoryConfig, ModelConfig, Transformer

pytestmark = pytest.mark.any_device  # its tensors go to the GPU when there is one

N, D, T, S = 40, 24, 7, 6


def device_of(backend):
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def layer_inputs(n_layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        idx = torch.randint(0, N // 2, (T, S), generator=g)  # rows >= N/2 never read; duplicates within a layer
        out.append((idx, torch.rand(T, S, generator=g), torch.randn(T, D, generator=g)))
    return out


def grads(n_layers, backend, dtype, into_grad, seed=0, table0=None, passes=1, merge=False):
    dev = device_of(backend)
    table = torch.nn.Parameter(table0.clone().to(dev, dtype))
    w_grads = []
    for _ in range(passes):
        loss = 0
        ws = []
        for idx, w, g in layer_inputs(n_layers, seed):
            w = w.to(dev).requires_grad_()
            ws.append(w)
            if into_grad:
                out = ops.memory_lookup_into_grad(idx.to(dev), w, table, backend=backend, merge=merge)
            else:
                out = ops.memory_lookup(idx.to(dev), w, table, backend=backend)
            loss = loss + (out.float() * g.to(dev)).sum()
        loss.backward()
        w_grads.append([w.grad.cpu() for w in ws])
    return table.grad.cpu(), w_grads


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_fp32_equals_autograd_sum_bit_for_bit(n_layers, backend):
    table0 = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    got, got_w = grads(n_layers, backend, torch.float32, True, table0=table0)
    ref, ref_w = grads(n_layers, backend, torch.float32, False, table0=table0)
    assert torch.equal(got, ref)
    for a, b in zip(got_w[0], ref_w[0]):
        assert torch.equal(a, b)
    assert not got[N // 2:].any()  # unread rows: zero


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_bf16_close_to_exact_sum_and_no_worse_than_autograd(n_layers, backend):
    table0 = torch.randn(N, D, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16).float()
    exact, _ = grads(n_layers, "reference", torch.float64, False, table0=table0)
    got, _ = grads(n_layers, backend, torch.bfloat16, True, table0=table0)
    ref, _ = grads(n_layers, backend, torch.bfloat16, False, table0=table0)
    assert got.dtype == torch.bfloat16
    err, ref_err = (got.double() - exact).norm(), (ref.double() - exact).norm()
    assert err <= 2**-7 * exact.norm()
    if backend == "reference" or torch.cuda.is_available():  # the Triton interpreter truncates to bf16
        assert err <= ref_err * 1.01 + 1e-12
    if n_layers == 1:
        assert torch.equal(got, ref)  # the first backward writes the gradient as the plain lookup does
    assert not got[N // 2:].any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_second_backward_adds_to_the_gradient(backend):
    """Gradient accumulation over micro-batches: a second backward adds to .grad, as autograd would."""
    table0 = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    once, _ = grads(2, backend, torch.float32, True, table0=table0)
    twice, _ = grads(2, backend, torch.float32, True, table0=table0, passes=2)
    ref, _ = grads(2, backend, torch.float32, False, table0=table0, passes=2)
    # the same sums in another order (autograd adds the step's layer sum to .grad; here each layer adds)
    torch.testing.assert_close(twice, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(twice, 2 * once, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,runs", [("reference", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_merged_pass_equals_autograd_sum(n_layers, backend, runs, monkeypatch):
    """merge=True: the weights' gradients in token order during backward, every layer's value rows in one pass at
    its end; the same sums as autograd's in another order (fp32), over one and two backward passes. runs: the
    pass sums rows in runs of 2 pairs first (as it does hot rows' runs of 256 on a GPU)."""
    if runs:
        from ops import triton_lookup

        monkeypatch.setattr(triton_lookup, "run_pairs", lambda P, compute_gw: 0 if compute_gw else 2)
    table0 = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    for passes in (1, 2):
        got, got_w = grads(n_layers, backend, torch.float32, True, table0=table0, passes=passes, merge=True)
        ref, ref_w = grads(n_layers, backend, torch.float32, False, table0=table0, passes=passes)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_w[-1], ref_w[-1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not got[N // 2:].any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merged_pass_rounds_bf16_once_per_row(backend):
    table0 = torch.randn(N, D, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16).float()
    exact, _ = grads(3, "reference", torch.float64, False, table0=table0)
    merged, _ = grads(3, backend, torch.bfloat16, True, table0=table0, merge=True)
    per_layer, _ = grads(3, backend, torch.bfloat16, True, table0=table0)
    err, per_layer_err = (merged.double() - exact).norm(), (per_layer.double() - exact).norm()
    assert err <= 2**-7 * exact.norm()
    if backend == "reference" or torch.cuda.is_available():  # the Triton interpreter truncates to bf16
        assert err <= per_layer_err * 1.01 + 1e-12


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("failed backward")


def test_work_left_by_a_failed_backward_is_dropped():
    """A backward that fails after a lookup's backward left its value work on the table never runs the end-of-pass
    callback; the next backward must not add that work to its own gradient."""
    table0 = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    (idx1, w1, g1), (idx2, w2, g2) = layer_inputs(2)
    table = torch.nn.Parameter(table0.clone())
    first = ops.memory_lookup_into_grad(idx1, w1, table, backend="reference", merge=True)
    # the second lookup's weights depend on the first lookup through a node whose backward fails: the second
    # lookup's backward runs (and leaves its work), then the pass fails before reaching the first
    w2_dep = (w2 + _FailInBackward.apply(first).sum() * 0).requires_grad_()
    loss = (ops.memory_lookup_into_grad(idx2, w2_dep, table, backend="reference", merge=True) * g2).sum()
    with pytest.raises(RuntimeError, match="failed backward"):
        loss.backward()
    assert table.grad is None and table._pending_value_grads is not None
    (ops.memory_lookup_into_grad(idx1, w1, table, backend="reference", merge=True) * g1).sum().backward()
    ref = torch.nn.Parameter(table0.clone())
    (ops.memory_lookup(idx1, w1, ref, backend="reference") * g1).sum().backward()
    torch.testing.assert_close(table.grad, ref.grad, rtol=1e-6, atol=1e-6)
    assert table._pending_value_grads is None


def test_only_for_leaf_parameters_without_hooks():
    table = torch.nn.Parameter(torch.randn(N, D))
    assert ops.can_accumulate(table)
    assert not ops.can_accumulate(table.detach().requires_grad_())  # not a Parameter
    table.register_hook(lambda g: g * 0)
    assert not ops.can_accumulate(table)  # the hook would never see the gradient
    with pytest.raises(ValueError, match="leaf parameter without hooks"):
        ops.memory_lookup_into_grad(torch.zeros(T, S, dtype=torch.long), torch.rand(T, S), table)


def _model(accumulate):
    m = MemoryConfig(layers=[0, 1], n_keys=8, heads=2, knn=4, k_dim=8, value_dtype="bfloat16",
                     accumulate_value_grad=accumulate)
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=41, dim=16, n_layers=2, n_heads=2, max_seq_len=32, memory=m))


def test_model_uses_it_for_a_bf16_table_and_falls_back_for_hooks(monkeypatch):
    tokens = torch.randint(0, 41, (2, 9), generator=torch.Generator().manual_seed(1))
    calls = []
    real = ops.memory_lookup_into_grad
    monkeypatch.setattr(ops, "memory_lookup_into_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = {}
    for accumulate in (True, False):
        model = _model(accumulate)
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        out[accumulate] = {n: p.grad for n, p in model.named_parameters()}
        assert len(calls) == (2 if accumulate else 0)  # both memory layers
        calls.clear()
    for name, g in out[False].items():
        assert (out[True][name].float() - g.float()).norm() <= 1e-2 * g.float().norm() + 1e-6, name
    model = _model(True)
    model.values.weight.register_hook(lambda g: g * 0)  # e.g. train.trainable_rows
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    assert calls == [] and not model.values.weight.grad.any()
    with torch.no_grad():
        model(tokens)  # evaluation: the plain lookup
    assert calls == []


def test_an_fp32_table_keeps_the_plain_lookup_under_autocast(monkeypatch):
    # Read through its per-forward bf16 cast, an fp32 table must not enter the into-grad path: it could not
    # accumulate there anyway, and the path is a graph break inside every compiled memory block.
    import model.memory as memory

    calls = []
    real = memory._lookup_into_grad
    monkeypatch.setattr(memory, "_lookup_into_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = MemoryConfig(layers=[0, 1], n_keys=8, heads=2, knn=4, k_dim=8, accumulate_value_grad=True)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=41, dim=16, n_layers=2, n_heads=2, max_seq_len=32, memory=m))
    tokens = torch.randint(0, 41, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    assert calls == [] and model.values.weight.grad.dtype == torch.float32
    model = _model(True)  # the bf16 table does take it, once per memory layer
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("n_layers,merge", [(1, False), (3, False), (3, True)])
def test_gpu_kernel_matches_reference(n_layers, merge):
    # one backward over every layer (merge: one value pass at its end), against fp64 autograd
    g = torch.Generator().manual_seed(0)
    n, d, t, s = 1 << 16, 1024, 4096, 128
    table = torch.nn.Parameter((torch.randn(n, d, generator=g) * 0.03).to(torch.bfloat16).cuda())
    ref = torch.nn.Parameter(table.detach().double())
    loss, loss_ref, ws = 0, 0, []
    for _ in range(n_layers):
        idx = torch.randint(0, n // 2, (t, s), generator=g)
        idx[:40] = 7  # a hot row: 5120 pairs per layer (the merged pass sums it in runs)
        idx = idx.cuda()
        w = torch.rand(t, s, generator=g).cuda()
        go = torch.randn(t, d, generator=g).cuda()
        w, w_ref = w.clone().requires_grad_(), w.double().requires_grad_()
        ws.append((w, w_ref))
        loss = loss + (ops.memory_lookup_into_grad(idx, w, table, backend="triton", merge=merge).float() * go).sum()
        loss_ref = loss_ref + (ops.memory_lookup(idx, w_ref, ref, backend="reference") * go.double()).sum()
    loss.backward()
    loss_ref.backward()
    for w, w_ref in ws:
        assert (w.grad.double() - w_ref.grad).norm() <= 1e-2 * w_ref.grad.norm()
    err = (table.grad.double() - ref.grad).norm()
    assert err <= 2**-8 * ref.grad.norm()
    assert not table.grad[n // 2:].any()



def test_micro_batches_under_activation_checkpointing_add_once_each():
    # Recomputation re-runs the forward, not the into-grad backward: each micro-batch's rows are added exactly once,
    # the second micro-batch's onto the first's (as the trainer accumulates them).
    from train.parallelize import apply_activation_checkpointing

    def table_grad(accumulate, micro_batches):
        model = _model(accumulate)
        apply_activation_checkpointing(model)
        g = torch.Generator().manual_seed(2)
        for _ in range(micro_batches):
            tokens = torch.randint(0, 41, (2, 9), generator=g)
            model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        return model.values.weight.grad.float()

    got, want = table_grad(True, 2), table_grad(False, 2)
    assert (got - want).norm() <= 1e-2 * want.norm()
    assert (table_grad(True, 1) - want).norm() > 0.2 * want.norm()  # a dropped micro-batch would show


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("merge", [False, True])
def test_the_gradients_summary_is_known_until_it_changes(backend, merge):
    """The pass that writes .grad whole sums its squares and records the rows its pairs touched: known while .grad is
    that tensor, unchanged; unknown once a later pass adds rows, after an in-place change, a new .grad, or none."""
    dev = device_of(backend)
    table = torch.nn.Parameter(torch.randn(N, D, generator=torch.Generator().manual_seed(9)).to(dev, torch.bfloat16))

    def backward():
        loss = 0
        for idx, w, g in layer_inputs(2):
            out = ops.memory_lookup_into_grad(idx.to(dev), w.to(dev).requires_grad_(), table, backend=backend,
                                              merge=merge)
            loss = loss + (out.float() * g.to(dev)).sum()
        loss.backward()

    def known():
        sq, rows = ops.grad_sum_of_squares(table), ops.grad_nonzero_rows(table)
        assert (sq is None) == (rows is None)  # one summary
        return sq, rows

    assert known()[0] is None  # no gradient yet
    backward()
    sq, rows = known()
    if merge:  # one pass writes the whole gradient: its sum is the gradient's, its rows the ones the layers read
        assert sq is not None and sq.dtype == torch.float32
        torch.testing.assert_close(sq, table.grad.float().square().sum(), rtol=1e-5, atol=0)
        read = torch.zeros(N, dtype=torch.bool)
        read[torch.cat([idx.reshape(-1) for idx, _, _ in layer_inputs(2)])] = True
        assert not read.all() and torch.equal(rows.cpu(), read)
        assert not table.grad[~rows].any() and table.grad[rows].float().abs().sum(1).gt(0).all()
    else:  # the second layer's backward added rows to what the first wrote
        assert sq is None
    backward()  # gradient accumulation: rows added
    assert known()[0] is None
    table.grad = None
    backward()
    assert (known()[0] is not None) == merge
    table.grad.mul_(0.5)  # e.g. clipping
    assert known()[0] is None
    table.grad = None
    backward()
    table.grad = table.grad.clone()  # the same values in another tensor: not known
    assert known()[0] is None
