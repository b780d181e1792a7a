"""The lookup backward's compiled pair sort (ops/cuda_sort.py): torch.sort's stable result on random rows, heavy
duplicates, edge sizes and int32 input; the lookup backward's gradients bit-equal with either sort; and the dispatch
around it: CPU pairs never build, a failed build warns once and the backward sorts with torch.sort, and training
builds it before its first step only where it would be used."""
import pytest
import torch

triton = pytest.importorskip("triton")

import ops  # noqa: E402
from ops import cuda_sort, triton_lookup  # noqa: E402


def test_cpu_pairs_never_try_the_build(monkeypatch):
    monkeypatch.setattr(cuda_sort, "available", lambda: pytest.fail("the build must not be tried for CPU pairs"))
    rows = torch.tensor([[3, 1], [1, 0]])
    sorted_rows, perm = triton_lookup._sort_pairs(rows, 4)
    assert sorted_rows.tolist() == [0, 1, 1, 3] and perm.tolist() == [3, 1, 2, 0]  # stable: pair 1 before pair 2


def test_a_failed_build_warns_once_and_torch_sort_runs(monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("nvcc not found")

    monkeypatch.setattr(cuda_sort, "_extension", failing_build)
    monkeypatch.setattr(cuda_sort, "applies", lambda flat, n_rows: True)  # as if these pairs were on a GPU
    cuda_sort.available.cache_clear()
    try:
        rows = torch.randint(0, 50, (40, 8), generator=torch.Generator().manual_seed(0))
        with pytest.warns(UserWarning, match="CUB pair sort could not be built.*nvcc not found"):
            got = triton_lookup._sort_pairs(rows, 50)
        again = triton_lookup._sort_pairs(rows, 50)
        assert calls == [1]  # tried once per process
        want = torch.sort(rows.reshape(-1).to(torch.int32), stable=True)
        for out in (got, again):
            assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    finally:
        cuda_sort.available.cache_clear()


def test_prepare_pair_sort_builds_only_where_training_would_sort_on_a_gpu(monkeypatch):
    built = []
    monkeypatch.setattr(cuda_sort, "available", lambda: built.append(1) or ok)
    ok, cuda = True, torch.device("cuda", 0)
    assert ops.prepare_pair_sort("cpu") is None and ops.prepare_pair_sort(cuda, backend="reference") is None
    assert built == []
    assert "compiled pair sort ready" in ops.prepare_pair_sort(cuda)
    assert "compiled pair sort ready" in ops.prepare_pair_sort("cuda", backend="triton")
    ok = False
    assert "could not be built; torch.sort runs" in ops.prepare_pair_sort(cuda)
    assert built == [1, 1, 1]

    def no_triton(op):
        raise ImportError("triton missing")

    monkeypatch.setattr(ops, "_triton_impl", no_triton)  # the backward would be the reference's: nothing to build
    assert ops.prepare_pair_sort(cuda) is None and built == [1, 1, 1]


def test_applies_only_to_cuda_pairs_it_can_index():
    meta = torch.empty(10, dtype=torch.int64, device="meta")
    assert not cuda_sort.applies(torch.zeros(10, dtype=torch.int64), 100)  # CPU
    assert not cuda_sort.applies(meta, 100)
    assert not cuda_sort.applies(torch.zeros(0, dtype=torch.int64), 100)


SORT_CASES = [  # pairs, rows of the table, index dtype
    (300_000, 1 << 20, torch.int64),  # 20 bits
    (300_000, (1 << 20) + 1, torch.int64),  # 21 bits: the top row needs the 21st
    (100_000, 7, torch.int64),  # nearly every pair a duplicate
    (65_537, 1, torch.int64),  # one row: a single bit, every pair equal
    (1, 1000, torch.int64),
    (4097, 1 << 31, torch.int64),  # 31 bits
    (50_000, 3000, torch.int32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("P,n_rows,dtype", SORT_CASES)
def test_gpu_sort_is_torch_sorts_stable_result(P, n_rows, dtype):
    assert cuda_sort.available()
    g = torch.Generator(device="cuda").manual_seed(P)
    rows = torch.randint(0, n_rows, (P,), device="cuda", generator=g, dtype=torch.int64)
    rows[: min(P, 5)] = n_rows - 1  # the largest row, which needs every sorted bit
    rows = rows.to(dtype)
    assert cuda_sort.applies(rows, n_rows)
    got_rows, got_perm = cuda_sort.sort_pairs(rows, n_rows)
    want_rows, want_perm = torch.sort(rows.to(torch.int64), stable=True)
    assert got_rows.dtype == torch.int32 and got_perm.dtype == torch.int32
    assert torch.equal(got_rows.long(), want_rows) and torch.equal(got_perm.long(), want_perm)


@pytest.mark.gpu
def test_gpu_sort_reads_a_strided_index_tensor():
    idx = torch.randint(0, 5000, (64, 300), device="cuda").t()  # [300, 64], not contiguous
    got_rows, got_perm = triton_lookup._sort_pairs(idx, 5000)
    want_rows, want_perm = torch.sort(idx.reshape(-1), stable=True)
    assert torch.equal(got_rows.long(), want_rows) and torch.equal(got_perm.long(), want_perm)


@pytest.mark.gpu
@pytest.mark.parametrize("sparse,compute_gw", [(False, True), (False, False), (True, True)])
def test_gpu_lookup_backward_is_the_same_with_either_sort(monkeypatch, sparse, compute_gw):
    T, S, N, D = 2048, 32, 3000, 256
    g = torch.Generator(device="cuda").manual_seed(1)
    idx = torch.randint(0, N, (T, S), device="cuda", generator=g)
    idx[:64] = 7  # a hot row
    w = torch.rand(T, S, device="cuda", generator=g)
    values = torch.randn(N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    grad_out = torch.randn(T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    compiled = triton_lookup.lookup_backward(grad_out, idx, w, values, compute_gw=compute_gw, sparse=sparse)
    monkeypatch.setattr(cuda_sort, "applies", lambda flat, n_rows: False)
    plain = triton_lookup.lookup_backward(grad_out, idx, w, values, compute_gw=compute_gw, sparse=sparse)
    if compute_gw:
        assert torch.equal(compiled[0], plain[0])
    if sparse:
        n = int(plain[1][2])
        assert torch.equal(compiled[1][2], plain[1][2]) and torch.equal(compiled[1][0], plain[1][0])
        assert torch.equal(compiled[1][1][:n], plain[1][1][:n])
    else:
        assert torch.equal(compiled[1], plain[1])
