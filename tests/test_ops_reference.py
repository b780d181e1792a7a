"""Reference ops against brute force: exact product-key top-k (incl. the tie rule) and the weighted lookup."""
import pytest
import torch

import ops
from ops import reference


def _brute_force_topk(query, keys1, keys2, knn):
    """Score every one of the n_keys**2 slots with its full key [K1_i; K2_j]; order score desc, slot asc."""
    H, n, half = keys1.shape
    full = torch.cat(
        [keys1[:, :, None, :].expand(H, n, n, half), keys2[:, None, :, :].expand(H, n, n, half)], dim=-1
    ).reshape(H, n * n, 2 * half)  # slot i1 * n + i2
    scores = torch.einsum("thd,hsd->ths", query, full)
    s, i = torch.sort(scores, dim=-1, descending=True, stable=True)
    return s[..., :knn], i[..., :knn]


@pytest.mark.parametrize(
    "T,H,k_dim,n_keys,knn",
    [(33, 2, 8, 7, 7), (20, 3, 6, 5, 1), (16, 1, 4, 13, 6), (9, 2, 10, 16, 16), (25, 4, 16, 11, 9)],
)
def test_search_matches_brute_force(T, H, k_dim, n_keys, knn):
    g = torch.Generator().manual_seed(T * 100 + knn)
    q = torch.randn(T, H, k_dim, generator=g, dtype=torch.float64)
    k1 = torch.randn(H, n_keys, k_dim // 2, generator=g, dtype=torch.float64)
    k2 = torch.randn(H, n_keys, k_dim // 2, generator=g, dtype=torch.float64)
    scores, idx = ops.product_key_search(q, k1, k2, knn, backend="reference")
    want_s, want_i = _brute_force_topk(q, k1, k2, knn)
    assert idx.dtype == torch.int64 and idx.shape == (T, H, knn)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(scores, want_s)
    assert (scores[..., :-1] >= scores[..., 1:]).all()


def test_search_float32_scores():
    q = torch.randn(5, 2, 8, dtype=torch.bfloat16)
    k = torch.randn(2, 6, 4, dtype=torch.bfloat16)
    scores, _ = ops.product_key_search(q, k, k.clone(), 3, backend="reference")
    assert scores.dtype == torch.float32


@pytest.mark.parametrize("knn", [1, 4, 6])
def test_search_ties_go_to_lower_slot(knn):
    # Small integer entries: sums are exact and ties are everywhere.
    g = torch.Generator().manual_seed(knn)
    q = torch.randint(-1, 2, (40, 2, 4), generator=g).double()
    k1 = torch.randint(-1, 2, (2, 6, 2), generator=g).double()
    k2 = torch.randint(-1, 2, (2, 6, 2), generator=g).double()
    scores, idx = reference.product_key_search(q, k1, k2, knn)
    want_s, want_i = _brute_force_topk(q, k1, k2, knn)
    assert torch.equal(idx, want_i)
    assert torch.equal(scores, want_s)


def test_search_candidate_pruning():
    a, b = reference.candidate_pairs(32)
    assert len(a) == 119  # the count quoted in MEMORY_LAYERS.md
    assert ((a + 1) * (b + 1) <= 32).all()


def test_search_is_differentiable():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k1 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k2 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: reference.product_key_search(*t, 4)[0], (q, k1, k2))


def test_search_rejects_bad_input():
    q = torch.randn(3, 2, 8)
    k = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="knn"):
        reference.product_key_search(q, k, k, 6)
    with pytest.raises(ValueError, match="keys"):
        reference.product_key_search(q, torch.randn(2, 5, 3), k, 2)
    with pytest.raises(ValueError, match="backend"):
        ops.product_key_search(q, k, k, 2, backend="cuda")


def _naive_lookup(indices, weights, values):
    return (values[indices.long()].double() * weights.double()[..., None]).sum(1)


def _lookup_case(kind, T=13, S=6, N=20, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    if kind == "duplicates":  # repeated slots inside each bag and across tokens
        idx = torch.randint(0, 4, (T, S), generator=g)
        idx[:, 1] = idx[:, 0]
    elif kind == "one_row":  # every token reads row 7 only
        idx = torch.full((T, S), 7)
    else:
        idx = torch.randint(0, N, (T, S), generator=g)
    w = torch.randn(T, S, generator=g, dtype=torch.float32)
    v = torch.randn(N, D, generator=g).to(dtype)
    return idx, w, v


@pytest.mark.parametrize("kind", ["random", "duplicates", "one_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 3])
def test_lookup_matches_naive_gather(kind, dtype, chunk):
    idx, w, v = _lookup_case(kind, dtype=dtype)
    w.requires_grad_(True)
    v.requires_grad_(True)
    out = reference.memory_lookup(idx, w, v, chunk_tokens=chunk)
    assert out.dtype == dtype and out.shape == (idx.shape[0], v.shape[1])
    grad = torch.randn_like(out)
    gw, gv = torch.autograd.grad(out, (w, v), grad)

    w64 = w.detach().double().requires_grad_(True)
    v64 = v.detach().double().requires_grad_(True)
    want = _naive_lookup(idx, w64, v64)
    want_gw, want_gv = torch.autograd.grad(want, (w64, v64), grad.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(gw.double(), want_gw, **tol)
    torch.testing.assert_close(gv.double(), want_gv, **tol)
    assert gv.dtype == dtype
    untouched = torch.ones(v.shape[0], dtype=torch.bool)
    untouched[idx.unique()] = False
    assert (gv[untouched] == 0).all()


def test_lookup_int32_indices_and_dispatch():
    idx, w, v = _lookup_case("random")
    a = ops.memory_lookup(idx.int(), w, v)  # auto -> reference on CPU
    b = ops.memory_lookup(idx, w, v, backend="reference")
    assert torch.equal(a, b)


def test_lookup_gradcheck():
    idx, w, v = _lookup_case("duplicates", T=5, S=4, N=6, D=3)
    w = w.double().requires_grad_(True)
    v = v.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, v: reference.memory_lookup(idx, w, v, chunk_tokens=2), (w, v))


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(64, 4, 32, generator=g)
    k1, k2 = torch.randn(2, 4, 50, 16, generator=g).unbind(0)
    s_cpu, i_cpu = reference.product_key_search(q, k1, k2, 16)
    s_gpu, i_gpu = reference.product_key_search(q.cuda(), k1.cuda(), k2.cuda(), 16)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-4, atol=1e-4)
    assert (i_gpu.cpu() == i_cpu).float().mean() > 0.99  # near-ties may round differently on the GPU
    idx, w, v = _lookup_case("duplicates", T=300, S=16, N=64, D=48, dtype=torch.bfloat16)
    out = reference.memory_lookup(idx.cuda(), w.cuda(), v.cuda(), chunk_tokens=64)
    torch.testing.assert_close(out.cpu().double(), _naive_lookup(idx, w, v), rtol=1e-2, atol=2e-2)
