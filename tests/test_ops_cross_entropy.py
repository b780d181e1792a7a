"""The chunked linear + cross-entropy equals the plain `cross_entropy(h @ W^T, targets)`: loss and gradients."""
import pytest
import torch
import torch.nn.functional as F

import ops
from model import Transformer
from model.config import ModelConfig, MemoryConfig
from ops.cross_entropy import softmax_xent_reference_


def plain_and_chunked(T, D, V, chunk, scale=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g)).requires_grad_()
    t = torch.randint(0, V, (T,), generator=g)
    plain = F.cross_entropy(h @ w.t(), t)
    (plain * scale).backward()
    ref = plain.detach(), h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = ops.linear_cross_entropy(h, w, t, chunk_tokens=chunk)
    (loss * scale).backward()
    return ref, (loss.detach(), h.grad, w.grad)


@pytest.mark.parametrize("chunk", [1, 7, 37, 64])
def test_chunked_equals_plain_fp32(chunk):
    (l0, gh0, gw0), (l1, gh1, gw1) = plain_and_chunked(37, 16, 50, chunk)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh1, gh0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-7)


def test_gradcheck_fp64():
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w: ops.linear_cross_entropy(h, w, t, chunk_tokens=3), (h, w))


def test_only_the_needed_gradients():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(9, 4)  # frozen output matrix
    ops.linear_cross_entropy(h, w, torch.randint(0, 9, (5,))).backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        loss = ops.linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), torch.zeros(5, dtype=torch.long)))


def plain_and_chunked_bf16(h, w, t, chunk_tokens):
    """Under bf16 autocast on h's device: the plain loss of F.linear's logits and its gradients (h, w), then the
    chunked loss, whose gradients are left in h.grad and w.grad."""
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(h, w).float(), t)
    plain.backward()
    ref = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(h, w, t, chunk_tokens=chunk_tokens)
    loss.backward()
    return plain, ref, loss


def test_bf16_autocast_close_to_plain_autocast():
    """Under autocast the logits are rounded to bf16 as the autocast linear rounds them; loss in fp32."""
    torch.manual_seed(1)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (64,))
    plain, ref, loss = plain_and_chunked_bf16(h, w, t, chunk_tokens=24)
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref[0], rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(w.grad, ref[1], rtol=2e-2, atol=2e-4)


@pytest.mark.any_device
def test_triton_row_kernel_equals_reference():
    from ops.triton_cross_entropy import softmax_xent_  # runs under TRITON_INTERPRET on CPU

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    for V in (37, 4096, 9000):  # below, at and above one block of the row loop
        x = 4 * torch.randn(3, V).to(dev)
        t = torch.randint(0, V, (3,)).to(dev)
        x_ref, x0 = x.clone(), x.clone().requires_grad_()
        loss = softmax_xent_(x, t, 0.25)
        loss_ref = softmax_xent_reference_(x_ref, t, 0.25)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-8)
        plain = F.cross_entropy(x0, t, reduction="none")
        (0.25 * plain.sum()).backward()
        torch.testing.assert_close(loss_ref, plain.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_ref, x0.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_equals_loss_of_logits(tied):
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=16,
                      tie_embeddings=tied, memory=MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4, k_dim=8))
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, 97, (3, 13))
    logits = model(tokens[:, :-1])
    plain = F.cross_entropy(logits.reshape(-1, 97), tokens[:, 1:].reshape(-1))
    plain.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.gpu
def test_cuda_bf16_chunked_close_to_plain():
    """The CUDA path (Triton row kernel, fp32 weight-gradient accumulation) against the plain autocast loss."""
    torch.manual_seed(3)
    h = torch.randn(3000, 128, device="cuda", requires_grad=True)
    w = (0.1 * torch.randn(5000, 128, device="cuda")).requires_grad_()
    t = torch.randint(0, 5000, (3000,), device="cuda")
    plain, ref, loss = plain_and_chunked_bf16(h, w, t, chunk_tokens=1024)
    torch.testing.assert_close(loss, plain, rtol=1e-4, atol=1e-4)
    for got, want in zip((h.grad, w.grad), ref):
        assert (got - want).norm() <= 1e-2 * want.norm()
