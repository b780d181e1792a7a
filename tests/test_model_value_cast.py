"""Under autocast with gradients, the fp32 value table is read through one low-precision cast per forward (ops.cast_table),
and its gradient still reaches the fp32 parameter; small reads and no-grad forwards keep the fp32 table."""
import pytest
import torch

import model.memory as memory
import ops
from model import MemoryConfig, ModelConfig, Transformer


def _cfg(share=True):
    # 8 x 8 = 64 slots; 2 heads x 4 knn x 2 layers = 16 rows read per token
    m = MemoryConfig(layers=[0, 1], n_keys=8, heads=2, knn=4, k_dim=8, share_values=share)
    return ModelConfig(vocab_size=41, dim=16, n_layers=2, n_heads=2, max_seq_len=32, memory=m)


def test_table_for_forward_rules():
    w = torch.randn(64, 8, requires_grad=True)
    assert memory.table_for_forward(w, 64) is w  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = memory.table_for_forward(w, 64)
        assert cast.dtype == torch.bfloat16 and cast.requires_grad
        assert memory.table_for_forward(w, 63) is w  # fewer rows read than the table holds
        with torch.no_grad():
            assert memory.table_for_forward(w, 10**6) is w
        assert memory.table_for_forward(w, 64, enabled=False) is w  # model.memory.cast_values=false


def test_cast_table_gradient_is_cast_back():
    w = torch.randn(5, 3, requires_grad=True)
    out = ops.cast_table(w, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, w.detach().to(torch.bfloat16))
    g = torch.randn(5, 3).to(torch.bfloat16)
    out.backward(g)
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, g.float())


@pytest.mark.any_device
def test_triton_cast_kernel_rounds_like_torch():
    """fp32 -> bf16 to nearest even (ties, carries, overflow, subnormals, NaN) and bf16 -> fp32, bit for bit, the
    interpreted kernel included (its own conversion truncates)."""
    from ops.triton_cast import cast

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    specials = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x00000001, 0x80008000, 0x7FC00000,
                             0xFF800000], dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([specials, torch.randn(3 * 8195 - 8, generator=torch.Generator().manual_seed(0)) * 100]).to(dev)
    got, want = cast(x, torch.bfloat16), x.to(torch.bfloat16)
    nan = torch.isnan(want)  # NaN's payload bits differ between torch's own CPU and GPU casts
    assert torch.equal(torch.isnan(got), nan) and nan.sum() == 1
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    torch.testing.assert_close(cast(want, torch.float32), want.float(), rtol=0, atol=0, equal_nan=True)


def _loss_and_grads(model, tokens):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_autocast_model_casts_shared_table_once(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(_cfg())
    tokens = torch.randint(0, 41, (2, 9))  # 16 tokens x 16 rows = 256 >= 64 slots: cast
    calls = []
    real = ops.cast_table
    monkeypatch.setattr(ops, "cast_table", lambda w, dt: calls.append(w.shape) or real(w, dt))
    loss, grads = _loss_and_grads(model, tokens)
    assert calls == [(64, 16)]  # once for both layers
    assert model.values.weight.grad.dtype == torch.float32
    model.cfg.memory.cast_values = False  # the fp32 table, as before
    calls.clear()
    ref_loss, ref = _loss_and_grads(model, tokens)
    assert calls == []
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for name, g in ref.items():
        # bf16 rounding of the table, lookups and products: equal to a few bf16 ulps relative to the gradient's size
        assert (grads[name] - g).norm() <= 3e-2 * g.norm() + 1e-6, name
