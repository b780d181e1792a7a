"""Triton kernels (ops/triton_lookup.py, ops/triton_search.py) against ops.reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), which is slow: shapes are tiny. The
interpreter rounds fp32 -> bf16 differently from the GPU (and its bf16 dot is wrong, which the search kernel
avoids there), so bf16 comparisons allow a couple of bf16 ulps. GPU tests (`-m gpu`) use realistic shapes;
`pytest --device cuda` runs the small ones on the GPU too (tests/conftest.py).
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from ops import reference  # noqa: E402
from ops.triton_lookup import lookup_backward, memory_lookup, memory_lookup_backward  # noqa: E402
from ops.triton_search import product_key_search  # noqa: E402

pytestmark = pytest.mark.any_device  # its tensors go to the GPU when there is one

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)


def _indices(kind, T, S, N, gen):
    if kind == "random":
        return torch.randint(0, N, (T, S), generator=gen)
    if kind == "one_row":  # every token on one row: one long segment
        return torch.full((T, S), N - 1, dtype=torch.long)
    if kind == "dup_in_bag":  # duplicates inside each bag and across bags, few rows
        return torch.randint(0, 3, (T, S), generator=gen)
    raise ValueError(kind)


def _lookup_both(idx, w, v):
    """(out, grad_w, grad_v) of the kernel and of the reference on the same inputs and output gradient."""
    g = torch.randn(idx.shape[0], v.shape[1], generator=torch.Generator().manual_seed(7)).to(v.dtype).to(v.device)
    res = []
    for fn in (memory_lookup, reference.memory_lookup):
        ww = w.detach().clone().requires_grad_()
        vv = v.detach().clone().requires_grad_()
        out = fn(idx, ww, vv)
        out.backward(g)
        res.append((out.detach(), ww.grad, vv.grad))
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "one_row", "dup_in_bag"])
def test_lookup_matches_reference(dtype, kind):
    gen = torch.Generator().manual_seed(hash((str(dtype), kind)) % 2**31)
    T, S, N, D = 6, 5, 11, 37  # non-power-of-two S and D
    idx = _indices(kind, T, S, N, gen)
    idx = idx.to(torch.int32) if kind == "random" else idx  # int32 and int64 indices
    w = torch.randn(T, S, generator=gen)
    v = torch.randn(N, D, generator=gen).to(dtype)
    idx, w, v = idx.to(DEV), w.to(DEV), v.to(DEV)
    (out, gw, gv), (rout, rgw, rgv) = _lookup_both(idx, w, v)
    assert out.dtype == dtype and gv.dtype == dtype
    torch.testing.assert_close(out.float(), rout.float(), **_tol(dtype))
    torch.testing.assert_close(gw, rgw, **({"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else _tol(dtype)))
    torch.testing.assert_close(gv.float(), rgv.float(), **_tol(dtype))
    untouched = torch.ones(N, dtype=torch.bool, device=DEV)
    untouched[idx.long().flatten()] = False
    assert (gv[untouched] == 0).all()


def test_dense_value_gradient_writes_every_row(monkeypatch):
    """The dense gradient's buffer starts as garbage (poisoned here): touched rows get their sums and every
    untouched row its zeros, in the one backward launch."""
    from ops import triton_lookup

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    gen = torch.Generator().manual_seed(5)
    T, S, N, D = 4, 3, 29, 16  # 12 pairs over 29 rows: most rows untouched
    idx = torch.randint(0, N, (T, S), generator=gen).to(DEV)
    w, v = torch.randn(T, S, generator=gen).to(DEV), torch.randn(N, D, generator=gen).to(DEV)
    g = torch.randn(T, D, generator=gen).to(DEV)
    monkeypatch.setattr(triton_lookup.torch, "empty", poisoned_empty)
    _, gv = memory_lookup_backward(g, idx, w, v)
    monkeypatch.undo()
    vv = v.clone().requires_grad_()
    reference.memory_lookup(idx, w, vv).backward(g)
    torch.testing.assert_close(gv, vv.grad, atol=1e-5, rtol=1e-5)


def test_untouched_rows_in_order():
    from ops.triton_lookup import _untouched_rows

    rows = torch.tensor([1, 1, 3, 6, 6, 6], dtype=torch.int32, device=DEV)
    assert _untouched_rows(rows, 8)[:5].tolist() == [0, 2, 4, 5, 7]
    assert _untouched_rows(torch.arange(5, device=DEV), 5).numel() == 6  # none untouched: only the spare entry


def test_pair_segments_by_touched_row_and_by_row():
    from ops.triton_lookup import _row_segments, _segments

    rows = torch.tensor([1, 1, 3, 6, 6, 6], dtype=torch.int32, device=DEV)
    # the dense form's programs are rows: untouched rows 0, 2, 4, 5, 7 get empty ranges
    assert _row_segments(rows, 8).tolist() == [0, 0, 2, 2, 3, 3, 3, 6, 6]
    # the other forms' programs are touched rows in order; starts past the last (of M = min(P, N) = 6) are P
    seg_start, nseg, m = _segments(rows, 8)
    assert (seg_start.tolist(), nseg.tolist(), m) == ([0, 2, 3, 6, 6, 6, 6], [3], 6)
    assert _row_segments(torch.zeros(0, dtype=torch.int32, device=DEV), 3).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("S,D,idx_dtype,config", [
    (5, 37, torch.int64, None), (128, 300, torch.int32, None), (3, 64, torch.int64, None), (1, 16, torch.int64, None),
    (3, 600, torch.int64, None),  # rows wider than 2 KiB: column chunks by default
    (13, 300, torch.int64, (4, 64, 1, 4)),  # several programs per token, a partial last span, 5 column chunks
])
def test_weight_grad_in_token_order_matches_reference(S, D, idx_dtype, config):
    # partial slot blocks, several column chunks, duplicate rows inside a token's slots
    from ops.triton_lookup import lookup_weight_grad

    gen = torch.Generator().manual_seed(S * D)
    T, N = 4, 9
    idx = torch.randint(0, N, (T, S), generator=gen).to(idx_dtype).to(DEV)
    w = torch.randn(T, S, generator=gen).to(DEV)
    v = torch.randn(N, D, generator=gen).to(DEV)
    g = torch.randn(T, D, generator=gen).to(DEV)
    got = lookup_weight_grad(g, idx, w, v, config=config)
    assert got.dtype == torch.float32 and got.shape == (T, S)
    torch.testing.assert_close(got, reference.lookup_weight_grad(g, idx, w, v), atol=1e-4, rtol=1e-4)


def test_lookup_multi_column_chunks():
    # D > one column block of the forward (256 fp32) and several slot blocks
    gen = torch.Generator().manual_seed(1)
    T, S, N, D = 3, 3, 5, 300
    idx = torch.randint(0, N, (T, S), generator=gen)
    w = torch.randn(T, S, generator=gen)
    v = torch.randn(N, D, generator=gen)
    idx, w, v = idx.to(DEV), w.to(DEV), v.to(DEV)
    (out, gw, gv), (rout, rgw, rgv) = _lookup_both(idx, w, v)
    torch.testing.assert_close(out, rout)
    torch.testing.assert_close(gw, rgw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gv, rgv)


def test_lookup_forward_wide_rows_few_slots():
    # bf16 rows of 2048 columns and 5 slots: the 2-rows-per-step forward tile (two 1024-column chunks, a partial
    # last step), checked against the reference
    from ops.triton_lookup import fwd_config, lookup_forward

    assert fwd_config(5, 2048, 2)[:2] == (2, 1024)
    gen = torch.Generator().manual_seed(3)
    T, S, N, D = 3, 5, 7, 2048
    idx = torch.randint(0, N, (T, S), generator=gen).to(DEV)
    w = torch.randn(T, S, generator=gen).to(DEV)
    v = torch.randn(N, D, generator=gen).to(torch.bfloat16).to(DEV)
    out = lookup_forward(idx, w, v)
    torch.testing.assert_close(out.float(), reference.memory_lookup(idx, w, v).float(), **_tol(torch.bfloat16))


@pytest.mark.parametrize("D", [24, 300])
def test_lookup_sparse_form_matches_dense(D):
    # D=300 (fp32): three column chunks, the last one partly masked; the compact form runs a segment's chunks as
    # neighbouring programs of a 1-D grid
    gen = torch.Generator().manual_seed(2)
    T, S, N = 4, 3, 50
    idx = torch.randint(0, N, (T, S), generator=gen)
    w = torch.randn(T, S, generator=gen)
    v = torch.randn(N, D, generator=gen)
    g = torch.randn(T, D, generator=gen)
    idx, w, v, g = idx.to(DEV), w.to(DEV), v.to(DEV), g.to(DEV)
    gw_d, gv_d = memory_lookup_backward(g, idx, w, v)
    gw_s, rows, row_grads, n = memory_lookup_backward(g, idx, w, v, sparse=True)
    uniq = torch.unique(idx)
    assert rows.shape[0] == T * S and int(n) == uniq.numel()
    assert torch.equal(rows[: int(n)], uniq) and (rows[int(n):] == -1).all()  # padding: row -1, gradient unwritten
    assert torch.equal(row_grads[: int(n)], gv_d[uniq]) and torch.equal(gw_s, gw_d)


def test_lookup_backward_is_deterministic():
    gen = torch.Generator().manual_seed(3)
    T, S, N, D = 8, 6, 4, 40  # many duplicates per row
    idx = torch.randint(0, N, (T, S), generator=gen)
    w = torch.randn(T, S, generator=gen)
    v = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    g = torch.randn(T, D, generator=gen).to(torch.bfloat16)
    idx, w, v, g = idx.to(DEV), w.to(DEV), v.to(DEV), g.to(DEV)
    a = memory_lookup_backward(g, idx, w, v)
    b = memory_lookup_backward(g, idx, w, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("run,run_config,config", [(2, None, None), (3, (2, 1), None), (5, None, None), (64, None, None),
                                                   (2, None, (1, 32, 1)), (5, None, (1, 32, 1))])
def test_lookup_backward_hot_rows_in_runs(run, run_config, config):
    # rows read by more pairs than `run`: their full runs are summed by programs of their own and added by the
    # row's program with its remaining pairs (64: no run at all); every form against the reference. With one pair per
    # walk step (config), the first remaining pair is loaded as prepared by segment, and a row whose pairs all went
    # into runs (row 7 at run 5) has none left.
    gen = torch.Generator().manual_seed(run)
    T, S, N, D = 6, 5, 9, 24
    idx = torch.randint(0, 3, (T, S), generator=gen)  # rows 0-2 hot: about 10 pairs each
    idx[0] = 7  # a row of exactly 5 pairs: whole runs for run 5, a remainder for 2 and 3
    idx[1, 0] = 8  # a row of one pair
    w, v = torch.randn(T, S, generator=gen), torch.randn(N, D, generator=gen)
    g, old = torch.randn(T, D, generator=gen), torch.randn(N, D, generator=gen)
    idx, w, v, g, old = idx.to(DEV), w.to(DEV), v.to(DEV), g.to(DEV), old.to(DEV)
    ww, vv = w.clone().requires_grad_(), v.clone().requires_grad_()
    reference.memory_lookup(idx, ww, vv).backward(g)
    tol = dict(atol=1e-5, rtol=1e-5)
    kw = dict(run=run, run_config=run_config, config=config)
    gw, gv = lookup_backward(g, idx, w, v, **kw)
    torch.testing.assert_close(gw, ww.grad, **tol)
    torch.testing.assert_close(gv, vv.grad, **tol)
    assert lookup_backward(g, idx, w, v, compute_gw=False, **kw)[0] is None
    torch.testing.assert_close(lookup_backward(g, idx, w, v, compute_gw=False, **kw)[1], vv.grad, **tol)
    gw_acc, acc = lookup_backward(g, idx, w, v, accumulate_into=old.clone(), **kw)
    torch.testing.assert_close(acc, old + vv.grad, **tol)
    torch.testing.assert_close(gw_acc, ww.grad, **tol)
    _, (rows, row_grads, n) = lookup_backward(g, idx, w, v, compute_gw=False, sparse=True, **kw)
    torch.testing.assert_close(row_grads[: int(n)], vv.grad[rows[: int(n)]], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_gw,run", [(True, 0), (False, 0), (False, 2)])
@pytest.mark.parametrize("block_d", [16, 512])
def test_lookup_backward_sums_the_written_gradients_squares_and_marks_its_rows(dtype, compute_gw, run, block_d):
    # Both dense forms (touched rows then a list of untouched ones; one program per row, with and without hot-row
    # runs), column chunks of one part and of two (D over BLOCK_D, masked columns): the sum equals the gradient's
    # own, as written in its dtype.
    gen = torch.Generator().manual_seed(3)
    T, S, N, D = 6, 5, 13, 300
    idx = torch.randint(0, 4, (T, S), generator=gen)  # duplicates; rows 4.. never read
    idx[0, :2] = 9
    w, v = torch.randn(T, S, generator=gen), torch.randn(N, D, generator=gen).to(dtype)
    g = torch.randn(T, D, generator=gen).to(dtype)
    idx, w, v, g = idx.to(DEV), w.to(DEV), v.to(DEV), g.to(DEV)
    read = torch.zeros(N, dtype=torch.bool, device=DEV)
    read[idx.reshape(-1)] = True
    for fn, kw in ((lookup_backward, dict(run=run, config=(1, block_d, 2))), (reference.lookup_backward, {})):
        sq = torch.full((), float("nan"), device=DEV)
        nonzero = (torch.arange(N, device=DEV) % 2).bool()  # overwritten whole
        _, gv = fn(g, idx, w, v, compute_gw=compute_gw, sum_squares_out=sq, nonzero_rows_out=nonzero, **kw)
        assert gv.dtype == dtype
        torch.testing.assert_close(sq, gv.float().square().sum(), rtol=1e-5, atol=0)
        assert torch.equal(nonzero, read) and not gv[~nonzero].any()  # the rows some pair touched
    empty, none_read = torch.full((), float("nan"), device=DEV), torch.ones(N, dtype=torch.bool, device=DEV)
    lookup_backward(g[:0], idx[:0], w[:0], v, sum_squares_out=empty, nonzero_rows_out=none_read)
    assert float(empty) == 0.0 and not none_read.any()
    sq, nonzero = torch.zeros((), device=DEV), torch.zeros(N, dtype=torch.bool, device=DEV)
    for name, out in (("sum_squares_out", sq), ("nonzero_rows_out", nonzero)):
        for fn in (lookup_backward, reference.lookup_backward):
            with pytest.raises(ValueError, match=f"{name} needs the dense gradient written whole"):
                fn(g, idx, w, v, accumulate_into=torch.zeros_like(v), **{name: out})
        with pytest.raises(ValueError, match=f"{name} needs the dense gradient written whole"):
            lookup_backward(g, idx, w, v, sparse=True, **{name: out})


def test_lookup_rejects_bad_input():
    with pytest.raises(ValueError, match="indices must be int32 or int64"):
        memory_lookup(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weights"):
        memory_lookup(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3), torch.zeros(3, 4))


def _search_inputs(T, H, n_keys, k_dim, dtype, gen, device="cpu"):
    q = torch.randn(T, H, k_dim, generator=gen).to(dtype).to(device)
    k1 = torch.randn(H, n_keys, k_dim // 2, generator=gen).to(dtype).to(device)
    k2 = torch.randn(H, n_keys, k_dim // 2, generator=gen).to(dtype).to(device)
    return q, k1, k2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2, 20, 16, 4), (17, 1, 70, 24, 6)])  # n_keys not a block multiple, knn 6
def test_search_forward_matches_reference(dtype, shape):
    T, H, n_keys, k_dim, knn = shape
    q, k1, k2 = _search_inputs(T, H, n_keys, k_dim, dtype, torch.Generator().manual_seed(sum(shape)), DEV)
    s, i = product_key_search(q, k1, k2, knn)
    rs, ri = reference.product_key_search(q, k1, k2, knn)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (T, H, knn)
    assert torch.equal(i, ri)  # random inputs have no near-ties at these sizes
    torch.testing.assert_close(s, rs.float(), atol=1e-5, rtol=1e-5)


def test_search_chunk_as_wide_as_knn():
    # BLOCK_N == knn (rounded up): the chunk list is fully sorted instead of top-k'd before the merge
    from ops.triton_search import search_forward

    q, k1, k2 = _search_inputs(16, 1, 40, 16, torch.float32, torch.Generator().manual_seed(9), DEV)
    s, i = search_forward(q, k1, k2, 7, config=(16, 8, 4, 1))
    rs, ri = reference.product_key_search(q, k1, k2, 7)
    assert torch.equal(i, ri)
    torch.testing.assert_close(s, rs, atol=1e-5, rtol=1e-5)


def test_search_ties_go_to_lower_slot():
    # every sub-key row equal: all n_keys**2 slots tie, so the top-knn are slots 0..knn-1 in order. Integer
    # inputs keep every dot exact whatever the summation order.
    T, H, n_keys, k_dim, knn = 3, 1, 9, 16, 5
    q = torch.randint(-3, 4, (T, H, k_dim), generator=torch.Generator().manual_seed(0)).float()
    k1 = torch.ones(H, n_keys, k_dim // 2)
    k2 = torch.ones(H, n_keys, k_dim // 2)
    q, k1, k2 = q.to(DEV), k1.to(DEV), k2.to(DEV)
    s, i = product_key_search(q, k1, k2, knn)
    rs, ri = reference.product_key_search(q, k1, k2, knn)
    assert torch.equal(i, ri)
    assert (i.cpu() == torch.arange(knn)).all()
    # partial ties: equal sub-keys 2 and 5 of the first table; the lower one comes first
    k1 = torch.randint(-2, 3, (H, n_keys, k_dim // 2), generator=torch.Generator().manual_seed(1)).float()
    k1[:, 5] = k1[:, 2]
    k2 = torch.randint(-2, 3, (H, n_keys, k_dim // 2), generator=torch.Generator().manual_seed(2)).float()
    k1, k2 = k1.to(DEV), k2.to(DEV)
    assert torch.equal(product_key_search(q, k1, k2, knn)[1], reference.product_key_search(q, k1, k2, knn)[1])


def test_search_gradients_match_reference():
    T, H, n_keys, k_dim, knn = 6, 2, 12, 16, 4
    q, k1, k2 = _search_inputs(T, H, n_keys, k_dim, torch.float32, torch.Generator().manual_seed(5), DEV)
    g = torch.randn(T, H, knn).to(DEV)
    grads = []
    for fn in (product_key_search, reference.product_key_search):
        leaves = [x.clone().requires_grad_() for x in (q, k1, k2)]
        s, _ = fn(*leaves, knn)
        s.backward(g)
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # same inputs, same bits
    leaves = [x.clone().requires_grad_() for x in (q, k1, k2)]
    product_key_search(*leaves, knn)[0].backward(g)
    assert all(torch.equal(a.grad, b) for a, b in zip(leaves, grads[0]))


@pytest.mark.parametrize("shape,config", [((20, 1, 80, 16, 8), (16, 32, 4, 1)), ((16, 1, 128, 16, 16), (16, 64, 4, 1)),
                                          ((5, 2, 20, 16, 4), (16, 64, 4, 1))])
def test_search_launch_configs_equal_reference(shape, config):
    # chunks narrower than the table (the last one partial, two token blocks), whole chunks with a wider top-k, and
    # fewer sub-keys than a chunk: the running top-k's slots are the reference's under each launch config. Each
    # chunk costs seconds under the interpreter: tables of two or three chunks already merge across chunks.
    from ops.triton_search import search_forward

    T, H, n_keys, k_dim, knn = shape
    q, k1, k2 = _search_inputs(T, H, n_keys, k_dim, torch.float32, torch.Generator().manual_seed(T), DEV)
    _, i = search_forward(q, k1, k2, knn, config=config)
    assert torch.equal(i, reference.product_key_search(q, k1, k2, knn)[1])


def _search_grads_at(g, idx, q, k1, k2):
    """fp64 gradients of scores = q1 . K1[i1] + q2 . K2[i2] at fixed slots (what the backward computes)."""
    T, H, k_dim = q.shape
    n_keys, half = k1.shape[1], k_dim // 2
    q, k1, k2, g = q.double(), k1.double(), k2.double(), g.double()
    i1, i2 = idx // n_keys, idx % n_keys
    hh = torch.arange(H, device=idx.device).view(1, H, 1).expand_as(i1)
    gq = torch.cat([(g[..., None] * k1[hh, i1]).sum(2), (g[..., None] * k2[hh, i2]).sum(2)], -1)
    gk = []
    for i, qh, k in ((i1, q[..., :half], k1), (i2, q[..., half:], k2)):
        z = torch.zeros_like(k)
        z.index_put_((hh.reshape(-1), i.reshape(-1)), (g[..., None] * qh[:, :, None, :]).reshape(-1, half),
                     accumulate=True)
        gk.append(z)
    return gq, gk[0], gk[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_backward_dense_rows(dtype, monkeypatch):
    # duplicated sub-keys inside a row (summed before the scatter), bf16 GEMMs, and token chunks (small budget)
    import ops.triton_search as ts

    gen = torch.Generator().manual_seed(4)
    T, H, n_keys, k_dim, knn = 9, 2, 7, 16, 8
    q = torch.randn(T, H, k_dim, generator=gen).to(dtype).to(DEV)
    k1 = torch.randn(H, n_keys, k_dim // 2, generator=gen).to(DEV)
    k2 = torch.randn(H, n_keys, k_dim // 2, generator=gen).to(DEV)
    idx = torch.randint(0, n_keys * n_keys, (T, H, knn), generator=gen)
    idx[0, 0] = 3  # one slot (and its sub-keys) repeated in a row
    g = torch.randn(T, H, knn, generator=gen)
    idx, g = idx.to(DEV), g.to(DEV)
    want = _search_grads_at(g, idx, q, k1, k2)
    for budget in (ts._BWD_BUDGET, 2 * 2 * H * n_keys * 4):  # one chunk; chunks of 2 tokens
        monkeypatch.setattr(ts, "_BWD_BUDGET", budget)
        got = ts.search_backward(g, idx, q, k1, k2)
        assert got[0].dtype == dtype and got[1].dtype == torch.float32
        for a, b in zip(got, want):
            assert _rel(a, b) < (1e-6 if dtype == torch.float32 else 1e-2)
        again = ts.search_backward(g, idx, q, k1, k2)
        assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_search_rejects_bad_input():
    q, k1, k2 = _search_inputs(2, 1, 4, 8, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="knn"):
        product_key_search(q, k1, k2, 5)
    with pytest.raises(ValueError, match="keys"):
        product_key_search(q, k1[:, :, :3], k2, 2)


def _memory_block(q, k1, k2, values, knn):
    s, i = product_key_search(q, k1, k2, knn)
    w = torch.softmax(s, dim=-1)
    T, H, _ = q.shape
    return memory_lookup(i.view(T, H * knn), w.view(T, H * knn), values)


@pytest.mark.slow
def test_compiled_memory_block_equals_eager():
    T, H, n_keys, k_dim, knn, D = 4, 2, 8, 16, 4, 24
    gen = torch.Generator().manual_seed(11)
    q, k1, k2 = _search_inputs(T, H, n_keys, k_dim, torch.float32, gen, DEV)
    values = torch.randn(n_keys * n_keys, D, generator=gen).to(DEV)
    runs = []
    for fn in (_memory_block, torch.compile(_memory_block, fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in (q, k1, k2, values)]
        out = fn(*leaves[:3], leaves[3], knn)
        (out * out).sum().backward()
        runs.append([out.detach()] + [x.grad for x in leaves])
    for a, b in zip(*runs):  # inductor fuses the softmax differently: rounding-level differences only
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _dispatched_block(q, k1, k2, values, knn):
    import ops

    s, i = ops.product_key_search(q, k1, k2, knn, backend="triton")
    w = torch.softmax(s, dim=-1)
    T, H, _ = q.shape
    return ops.memory_lookup(i.view(T, H * knn), w.view(T, H * knn), values, backend="triton")


@pytest.mark.slow
def test_backend_dispatch_traces_without_a_graph_break():
    """The model reaches the kernels through ops' backend dispatch. An import there would be a graph break (and a
    graph break inside an activation-checkpointed block runs the whole block eagerly): once the kernels are
    loaded, the dispatch must trace into one graph."""
    T, H, n_keys, k_dim, knn, D = 4, 2, 8, 16, 4, 24
    gen = torch.Generator().manual_seed(12)
    q, k1, k2 = _search_inputs(T, H, n_keys, k_dim, torch.float32, gen, DEV)
    values = torch.randn(n_keys * n_keys, D, generator=gen).to(DEV)
    want = _dispatched_block(q, k1, k2, values, knn)  # eager: loads the kernels (on a GPU, `import ops` did)
    got = torch.compile(_dispatched_block, fullgraph=True)(q, k1, k2, values, knn)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- GPU, real shapes
def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D,idx_dtype", [(torch.bfloat16, 1536, torch.int32), (torch.float32, 100, torch.int64),
                                               (torch.bfloat16, 4096, torch.int64)])
def test_gpu_lookup_real_shapes(dtype, D, idx_dtype):
    torch.manual_seed(0)
    T, S, N = 2048, 128, 1 << 16
    idx = torch.randint(0, N, (T, S), device="cuda").to(idx_dtype)
    idx[:8] = 5  # a hot row
    w = torch.randn(T, S, device="cuda")
    v = torch.randn(N, D, device="cuda").to(dtype)
    (out, gw, gv), (rout, rgw, rgv) = _lookup_both(idx, w, v)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert _rel(out, rout) < tol and _rel(gw, rgw) < max(tol, 1e-4) and _rel(gv, rgv) < tol
    (_, gw2, gv2), _ = _lookup_both(idx, w, v)
    assert torch.equal(gw, gw2) and torch.equal(gv, gv2)


@pytest.mark.gpu
def test_gpu_compact_value_gradient_beyond_2_31_elements():
    # 600k touched rows of 4096 columns: offsets past 2^31 elements, which 32-bit program-id arithmetic wraps
    T, S, D = 5000, 120, 4096
    N = T * S
    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.randperm(N, device="cuda", generator=g).view(T, S)  # every row once
    w = torch.rand(T, S, device="cuda", generator=g)
    v = torch.empty(N, D, device="cuda", dtype=torch.bfloat16)  # only its shape and dtype are read (no grad_w)
    go = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    _, (rows, row_grads, n) = lookup_backward(go, idx, w, v, compute_gw=False, sparse=True)
    assert n.item() == N and torch.equal(rows, torch.arange(N, device="cuda"))
    pair = torch.argsort(idx.flatten())  # the pair of row k
    for r0 in (0, N // 2, N - 50_000):  # before and after the 2^31-element mark (row 524288)
        p = pair[r0:r0 + 50_000]
        want = (w.flatten()[p, None] * go[p // S].float()).bfloat16()
        assert torch.equal(row_grads[r0:r0 + 50_000], want), r0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_search_real_shapes(dtype):
    T, H, n_keys, k_dim, knn = 2048, 4, 1024, 512, 32
    q, k1, k2 = _search_inputs(T, H, n_keys, k_dim, dtype, torch.Generator().manual_seed(0), "cuda")
    s, i = product_key_search(q, k1, k2, knn)
    rs, ri = reference.product_key_search(q, k1, k2, knn)
    if dtype == torch.float32:
        # different fp32 summation orders may swap near-ties in a few rows, nothing else
        assert (i == ri).float().mean().item() > 0.999
        torch.testing.assert_close(s, rs, atol=1e-4, rtol=1e-5)
    else:
        torch.testing.assert_close(s, rs, atol=2e-2, rtol=1e-2)
        assert (i == ri).float().mean().item() > 0.95
    g = torch.randn_like(s)
    grads = []
    for fn in (product_key_search, reference.product_key_search):
        leaves = [x.clone().requires_grad_() for x in (q, k1, k2)]
        out, _ = fn(*leaves, knn)
        out.backward(g)
        grads.append([x.grad for x in leaves])
    if dtype == torch.float32:
        for a, b in zip(*grads):
            assert _rel(a, b) < 1e-3
    # the backward at the kernel's own slots against fp64 (bf16: W and grad_q rounded to bf16 once)
    from ops.triton_search import search_backward

    want = _search_grads_at(g, i, q, k1, k2)
    got = search_backward(g, i, q, k1, k2)
    for a, b in zip(got, want):
        assert _rel(a, b) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_gpu_kernels_never_sync_with_the_host():
    """A host sync inside a layer's forward or backward stalls the launch queue once per layer, and on several
    GPUs leaves the other ranks waiting (issue 5 found one in the lookup backward). Sync debug mode errors on any."""
    T, S, N, D = 1024, 64, 1 << 14, 256
    idx = torch.randint(0, N, (T, S), device="cuda")
    w = torch.randn(T, S, device="cuda").softmax(-1).requires_grad_()
    v = torch.randn(N, D, device="cuda").to(torch.bfloat16).requires_grad_()
    q, k1, k2 = (x.requires_grad_() for x in _search_inputs(T, 4, 256, 128, torch.bfloat16,
                                                            torch.Generator().manual_seed(1), "cuda"))

    def step():
        scores, _ = product_key_search(q, k1, k2, 16)
        out = memory_lookup(idx, w, v)
        (out.float().sum() + scores.float().sum()).backward()

    step()  # first calls compile and autotune (those may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
