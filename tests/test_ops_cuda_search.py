"""The compiled CUDA product-key search (ops/cuda_search.py): an exact selection of its own scores (random rows, many
ties, one dominant sub-key, small and large key counts, knn 1..32, fp16) within rounding of the Triton kernel, the
Triton backward, and the dispatch around it: nothing is built on CPU, a failed build warns once and the op runs the
Triton kernel instead."""
import pytest
import torch

triton = pytest.importorskip("triton")

import ops  # noqa: E402
from ops import cuda_build, cuda_search, triton_search  # noqa: E402

pytestmark = pytest.mark.any_device  # its tensors go to the GPU when there is one


def _inputs(T, H, NK, half, dtype=torch.bfloat16, kind="random", device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # small integers: many equal scores inside a half and among the candidate sums
        q = torch.randint(-2, 3, (T, H, 2 * half), generator=g).to(dtype)
        k1 = torch.randint(-1, 2, (H, NK, half), generator=g).float()
        k2 = torch.randint(-1, 2, (H, NK, half), generator=g).float()
    else:
        q = torch.randn(T, H, 2 * half, generator=g)
        k1 = torch.randn(H, NK, half, generator=g) / half**0.5
        k2 = torch.randn(H, NK, half, generator=g) / half**0.5
        if kind == "peaked":  # one sub-key of half 1 far above the rest: its 32 candidate pairs are the top 32
            q[..., :half] += 4 * half**0.5 * k1[:, torch.arange(T) % NK].transpose(0, 1)
        q = q.to(dtype)
    return q.to(device), k1.to(device), k2.to(device)


def test_nothing_is_built_or_used_on_cpu(monkeypatch):
    def no_build():
        raise AssertionError("the CUDA search must not be built on CPU")

    monkeypatch.setattr(cuda_search, "_extension", no_build)
    q, k1, k2 = _inputs(9, 2, 16, 4, device="cpu")
    assert not cuda_search.applies(q, k1, 4)
    scores, slots = ops.product_key_search(q, k1, k2, 4)  # auto on CPU: the reference
    assert scores.shape == slots.shape == (9, 2, 4)
    with pytest.raises(ValueError, match="needs CUDA bf16/fp16 queries"):
        cuda_search.product_key_search(q, k1, k2, 4)


def test_applies_only_where_the_kernel_fits():
    from types import SimpleNamespace

    def fits(dtype=torch.bfloat16, n_keys=1024, knn=32, cuda=True):
        query = SimpleNamespace(is_cuda=cuda, dtype=dtype)  # only its device and dtype are read
        return cuda_search.applies(query, torch.empty(4, n_keys, 8, device="meta"), knn)

    assert fits() and fits(torch.float16) and fits(n_keys=2048, knn=1) and fits(n_keys=32, knn=32)
    assert not fits(cuda=False) and not fits(torch.float32)  # fp32 queries: exact fp32 dots elsewhere
    assert not fits(knn=33) and not fits(n_keys=4096) and not fits(n_keys=16, knn=32)


def test_a_failed_build_warns_once_and_the_op_runs_the_triton_kernel(monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("nvcc not found")

    monkeypatch.setattr(cuda_search, "_extension", failing_build)
    cuda_search.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built.*nvcc not found"):
            assert not cuda_search.available()
        assert not cuda_search.available() and calls == [1]  # tried once per process
        # the op itself falls back to the Triton kernel (on CPU under the interpreter): its results and gradients
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        q, k1, k2 = _inputs(6, 2, 16, 8, device=dev, seed=3)
        got = {}
        for name, op in (("cuda", cuda_search._search_op), ("triton", triton_search._search_op)):
            qq, kk1, kk2 = (t.clone().requires_grad_() for t in (q if dev == "cuda" else q.float(), k1, k2))
            scores, slots = op(qq, kk1, kk2, 4)
            (scores * torch.arange(4.0, device=dev)).sum().backward()
            got[name] = (scores, slots, qq.grad, kk1.grad, kk2.grad)
        for a, b in zip(got["cuda"], got["triton"]):
            assert torch.equal(a, b)
    finally:
        cuda_search.available.cache_clear()


def test_the_ninja_of_an_inactive_venv_is_put_on_path(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setitem(sys.modules, "ninja", types.SimpleNamespace(BIN_DIR=str(tmp_path)))
    monkeypatch.setattr(cuda_build.shutil, "which", lambda name: "/usr/bin/ninja")
    cuda_build._ninja_on_path()
    assert cuda_build.os.environ["PATH"] == "/usr/bin"  # found: left alone
    monkeypatch.setattr(cuda_build.shutil, "which", lambda name: None)
    cuda_build._ninja_on_path()
    assert cuda_build.os.environ["PATH"].split(":")[0] == str(tmp_path)


CASES = [  # T, H, NK, half, knn, dtype, kind
    (3000, 4, 1024, 256, 32, torch.bfloat16, "random"),
    (3000, 4, 1024, 256, 32, torch.bfloat16, "ties"),
    (3000, 4, 1024, 256, 32, torch.bfloat16, "peaked"),
    (513, 1, 2048, 64, 32, torch.bfloat16, "random"),
    (77, 2, 40, 16, 5, torch.float16, "random"),
    (77, 2, 40, 16, 5, torch.bfloat16, "ties"),
    (130, 3, 32, 32, 32, torch.bfloat16, "random"),
    (130, 3, 256, 32, 1, torch.bfloat16, "ties"),
    (0, 2, 64, 16, 8, torch.bfloat16, "random"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,NK,half,knn,dtype,kind", CASES)
def test_gpu_exact_selection_close_to_the_triton_kernel(T, H, NK, half, knn, dtype, kind):
    assert cuda_search.available()
    q, k1, k2 = _inputs(T, H, NK, half, dtype, kind)
    scores, slots = cuda_search.search_forward(q, k1, k2, knn)
    # exact for its own scores (the same GEMMs), ties to the lower index
    s1 = triton_search._bmm_f32(q[..., :half].transpose(0, 1), k1.to(dtype).transpose(1, 2))
    s2 = triton_search._bmm_f32(q[..., half:].transpose(0, 1), k2.to(dtype).transpose(1, 2))
    want_scores, want_slots = ops.reference.select_top_slots(s1.transpose(0, 1), s2.transpose(0, 1), knn)
    assert torch.equal(scores, want_scores) and torch.equal(slots, want_slots)
    # the Triton kernel's dots may round differently: scores within fp32 rounding, slots the same but near-ties
    t_scores, t_slots = triton_search.search_forward(q, k1, k2, knn)
    torch.testing.assert_close(scores, t_scores, rtol=1e-5, atol=1e-5)
    if T:
        same_rows = (t_slots == slots).all(-1).float().mean().item()
        assert same_rows > (0.999 if kind == "ties" else 0.97)


@pytest.mark.gpu
def test_gpu_chunks_of_tokens_give_the_same_result(monkeypatch):
    q, k1, k2 = _inputs(1000, 2, 128, 32)
    whole = cuda_search.search_forward(q, k1, k2, 16)
    monkeypatch.setattr(cuda_search, "_SCORES_BUDGET", 2 * 2 * 128 * 4 * 300)  # chunks of 300 tokens
    parts = cuda_search.search_forward(q, k1, k2, 16)
    # other GEMM shapes may round a score differently; a misplaced chunk would disagree on all its rows
    torch.testing.assert_close(whole[0], parts[0], rtol=1e-5, atol=1e-5)
    for c0 in range(0, 1000, 300):
        assert (whole[1][c0:c0 + 300] == parts[1][c0:c0 + 300]).all(-1).float().mean() > 0.97


@pytest.mark.gpu
def test_gpu_auto_uses_it_and_its_gradients_are_the_triton_backwards(monkeypatch):
    used = []
    real = cuda_search.search_forward
    monkeypatch.setattr(cuda_search, "search_forward", lambda *a: used.append(1) or real(*a))
    q, k1, k2 = _inputs(600, 4, 1024, 64)
    grads = {}
    for backend in ("auto", "triton"):
        qq, kk1, kk2 = (t.clone().requires_grad_() for t in (q, k1, k2))
        scores, slots = ops.product_key_search(qq, kk1, kk2, 32, backend=backend)
        (scores * torch.linspace(1, 2, 32, device="cuda")).sum().backward()
        grads[backend] = (scores, slots, qq.grad, kk1.grad, kk2.grad)
    assert used == [1]  # auto, not triton
    auto, triton_ = grads["auto"], grads["triton"]
    assert (auto[1] == triton_[1]).all(-1).float().mean() > 0.97
    same = (auto[1] == triton_[1]).all(-1).all(-1)  # tokens whose slots agree in every head: same gradients there
    torch.testing.assert_close(auto[2][same], triton_[2][same], rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,NK,half,knn,dtype,t0,n", [
    (3000, 4, 1024, 64, 32, torch.bfloat16, 0, 3000),
    (3000, 4, 1024, 64, 32, torch.bfloat16, 1234, 700),  # a chunk of tokens in the middle
    (500, 2, 40, 16, 5, torch.float16, 0, 500),  # rows of 40: no 16-byte stores
    (500, 3, 2048, 16, 32, torch.bfloat16, 499, 1),
    (257, 1, 32, 8, 1, torch.bfloat16, 0, 257),
])
def test_gpu_dense_gradient_rows_equal_the_triton_kernels(T, H, NK, half, knn, dtype, t0, n):
    q, k1, k2 = _inputs(T, H, NK, half, dtype)
    _, slots = cuda_search.search_forward(q, k1, k2, knn)  # real duplicate patterns: a sub-key in many slots
    g = torch.randn(T, H, knn, device="cuda")
    got = cuda_search.dense_grad_rows(slots, g, t0, n, NK, dtype)
    want = triton_search.dense_grad_rows(slots, g, t0, n, NK, dtype)
    for a, b in zip(got, want):
        assert a.shape == (H, n, NK) and a.dtype == dtype
        # sums of three or more slots may add in another order (fp32), then round to another 16-bit value
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-6)
        assert (a != b).float().mean() < 1e-3
        assert torch.equal(a != 0, b != 0)  # the same sub-keys, zeros everywhere else


def test_prepare_search_builds_only_what_a_model_would_use(monkeypatch):
    built = []

    class FakeSearch:  # the compiled search's dispatch rules, with a build that only records the call
        MAX_KNN, MAX_KEYS = cuda_search.MAX_KNN, cuda_search.MAX_KEYS
        fits = staticmethod(cuda_search.fits)

        @staticmethod
        def available():
            built.append(1)
            return ok

    monkeypatch.setattr(ops, "_CUDA_SEARCH", [FakeSearch])
    ok = True
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    assert ops.prepare_search("cpu", bf16, 32, 1024) is None  # CPU: the reference
    assert ops.prepare_search(cuda, None, 32, 1024) is None  # fp32 (no autocast): fp32 queries, the reference
    assert ops.prepare_search(cuda, bf16, 32, 1024, backend="triton") is None
    assert ops.prepare_search(cuda, bf16, 64, 1024) is None and ops.prepare_search(cuda, bf16, 32, 4096) is None
    assert built == []
    assert "compiled CUDA top-k ready" in ops.prepare_search(cuda, bf16, 32, 1024)
    ok = False
    assert "could not be built; the Triton search runs" in ops.prepare_search(cuda, torch.float16, 8, 256)
    assert built == [1, 1]
    monkeypatch.setattr(ops, "_CUDA_SEARCH", [])  # a machine where the module did not import
    assert ops.prepare_search(cuda, bf16, 32, 1024) is None
