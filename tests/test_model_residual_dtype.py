"""model.residual_dtype=autocast: the residual stream between blocks in the autocast dtype (bf16), norms computing in
fp32 and writing the input's dtype, parameters and their gradients fp32; the default keeps an fp32 stream."""
import pytest
import torch

from model import MemoryConfig, ModelConfig, Transformer
from model.norms import RMSNorm, rms_normalize


def test_norm_keep_dtype_rounds_once_to_the_input_dtype():
    torch.manual_seed(0)
    x = torch.randn(5, 64).to(torch.bfloat16)
    keep, plain = RMSNorm(64, keep_dtype=True), RMSNorm(64)
    with torch.no_grad():
        keep.weight.copy_(torch.rand(64) + 0.5)
        plain.weight.copy_(keep.weight)
    out = keep(x)
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + keep.eps) * keep.weight).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    assert plain(x).dtype == torch.float32  # off: the fp32 weight promotes (the memory layer's query norm)
    # an fp32 input gives the same bits either way
    x32 = torch.randn(5, 64)
    assert torch.equal(keep(x32), plain(x32))
    assert torch.equal(plain(x32), rms_normalize(x32, plain.eps) * plain.weight)


def _model(residual_dtype):
    torch.manual_seed(0)
    memory = MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4, k_dim=8)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, multiple_of=16, max_seq_len=32,
                      residual_dtype=residual_dtype, memory=memory)
    return Transformer(cfg)


def _run(model, autocast):
    """Loss, {module: (input dtype, output dtype)} of blocks and norms, parameter gradients."""
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, (args[0].dtype, out.dtype))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if name.count(".") == 1 or name.endswith(("attention_norm", "ffn_norm")) or name == "norm"]
    t = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(t[:, :-1], targets=t[:, 1:])
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), seen, {n: p.grad for n, p in model.named_parameters()}


def test_residual_stream_is_bf16_under_autocast_and_gradients_stay_fp32():
    loss_fp32, seen_fp32, _ = _run(_model("fp32"), autocast=True)
    loss_bf16, seen_bf16, grads = _run(_model("autocast"), autocast=True)
    assert set(seen_bf16) == {"layers.0", "layers.1", "layers.2", "norm"} | {
        f"layers.{i}.{n}" for i in range(3) for n in ("attention_norm", "ffn_norm")}
    assert all(v == (torch.bfloat16, torch.bfloat16) for v in seen_bf16.values()), seen_bf16
    # the default: an fp32 stream, blocks in and out; the norms' fp32 weight makes their output fp32
    assert all(v == (torch.float32, torch.float32) for v in seen_fp32.values()), seen_fp32
    assert all(p.dtype == torch.float32 for p in _model("autocast").parameters())
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert torch.isfinite(loss_bf16) and loss_bf16.item() == pytest.approx(loss_fp32.item(), abs=0.02)


def test_residual_dtype_without_autocast_changes_nothing():
    # fp32 (CPU default precision): the option is a no-op, bit for bit
    a_loss, a_seen, a_grads = _run(_model("fp32"), autocast=False)
    b_loss, b_seen, b_grads = _run(_model("autocast"), autocast=False)
    assert torch.equal(a_loss, b_loss) and a_seen == b_seen
    assert all(torch.equal(a_grads[n], b_grads[n]) for n in a_grads)
    assert list(_model("autocast").state_dict()) == list(_model("fp32").state_dict())
