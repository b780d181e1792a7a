"""The flash4 attention backend: where it runs, what it says where it cannot, its ops' shapes without a GPU, and on
a GPU with flash-attn-4 installed, its outputs and gradients against an fp32 reference, in one compiled graph."""
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import ops
from model import ModelConfig, Transformer, prepare_attention
from model.attention import Attention, flash4_wanted
from ops import flash_attention as fa

needs_flash4 = pytest.mark.skipif(fa.installed_version() is None, reason="flash-attn-4 is not installed")


def test_flash4_problem_names_each_reason(monkeypatch):
    cuda = torch.device("cuda")
    assert "CUDA GPUs only" in fa.flash4_problem(torch.device("cpu"), torch.bfloat16, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(fa, "installed_version", lambda: "4.0.0b36")
    assert "bf16 or fp16" in fa.flash4_problem(cuda, None, 64)
    assert "compute capability 9.0" in fa.flash4_problem(cuda, torch.bfloat16, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fa.flash4_problem(cuda, torch.float16, 64) is None
    assert fa.flash4_problem(cuda, torch.bfloat16, 256) is None
    for head_dim in (4, 60, 512):
        assert "multiples of 8 from 8 to 256" in fa.flash4_problem(cuda, torch.bfloat16, head_dim)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert "multiples of 8 from 8 to 128" in fa.flash4_problem(cuda, torch.bfloat16, 256)
    monkeypatch.setattr(fa, "installed_version", lambda: None)
    assert "flash-attn-4 package is not installed" in fa.flash4_problem(cuda, torch.bfloat16, 64)


def test_prepare_attention_refuses_flash4_where_it_cannot_run():
    cfg = ModelConfig(dim=256, n_heads=4)
    with pytest.raises(ValueError, match="model.attention_backend: flash4 cannot run here: it runs on CUDA GPUs"):
        prepare_attention(replace(cfg, attention_backend="flash4"), "cpu", None)
    assert prepare_attention(replace(cfg, attention_backend="auto"), "cpu", None) is None  # no word on a CPU
    assert prepare_attention(cfg, "cuda", torch.bfloat16) is None  # sdpa


def test_auto_falls_back_to_sdpa_on_a_machine_without_it(monkeypatch):
    assert not flash4_wanted("sdpa", 64) and flash4_wanted("flash4", 64)
    assert not flash4_wanted("auto", 64)  # the CPU session: no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def problem(device, dtype, head_dim):
        asked.append(head_dim)
        return None if head_dim == 64 else "head size"

    monkeypatch.setattr(fa, "flash4_problem", problem)
    assert flash4_wanted("auto", 64) and not flash4_wanted("auto", 32)
    assert asked == [64, 32]
    assert Attention(128, 2, 2, backend="auto").flash4 and not Attention(128, 4, 4, backend="auto").flash4


def test_flash4_layer_takes_sdpa_for_calls_the_kernels_do_not_serve():
    # CPU tensors (as a checkpoint trained with flash4 is evaluated on a CPU), fp32, masks and KV caches: SDPA
    cfg = ModelConfig(vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    a = Transformer(cfg).eval()
    b = Transformer(ModelConfig(**{**cfg.__dict__, "attention_backend": "flash4"})).eval()
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 37, (2, 9))
    assert torch.equal(a(tokens), b(tokens))
    logits = []
    for m in (a, b):
        cache = m.make_kv_cache(2, 16)
        m(tokens[:, :5], cache=cache)
        logits.append(m(tokens[:, 5:], cache=cache, start_pos=5))
    assert torch.equal(*logits)


def test_flash_attention_refuses_cpu_tensors_with_the_key():
    q = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="model.attention_backend=flash4: needs bf16/fp16 CUDA tensors"):
        fa.flash_attention(q, q, q)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)  # importing it raises ImportError
    with pytest.raises(ImportError, match=r"flash-attn-4 package \(pip install 'mnemo\[flash4\]'\)"):
        fa.prepare()


def test_loading_it_silences_its_compilers_aux_data_warning_only(monkeypatch):
    import types
    import warnings

    fake = types.ModuleType("flash_attn.cute.interface")
    monkeypatch.delitem(sys.modules, "flash_attn.cute.interface", raising=False)
    monkeypatch.setattr(fa.importlib, "import_module", lambda name: fake)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fa.prepare()
        warnings.warn("Argument aux_data (position 17) cannot be converted to a JitArgument for function 'f'")
        warnings.warn("Argument other (position 3) cannot be converted to a JitArgument")
    assert [str(w.message) for w in seen] == ["Argument other (position 3) cannot be converted to a JitArgument"]


def test_fake_kernels_give_the_real_shapes_without_a_gpu():
    # what torch.compile traces with: output like q, the log-sum-exp [B, H, L] in fp32, gradients like q, k, v
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 96, 8, 64, device="cuda", dtype=torch.bfloat16)
        kv = torch.empty(2, 96, 2, 64, device="cuda", dtype=torch.bfloat16)
        out, lse = torch.ops.mnemo.flash4_forward(q, kv, kv)
        grads = torch.ops.mnemo.flash4_backward(out, q, kv, kv, out, lse)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, q.dtype, (2, 8, 96), torch.float32)
    assert [g.shape for g in grads] == [q.shape, kv.shape, kv.shape]


def _sdpa(q, k, v, grad, dtype):
    """SDPA's causal attention of [B, L, H, D] inputs (GQA by repeating k, v) on copies in `dtype`: the output and the
    copies, whose .grad holds the gradients for `grad`."""
    rep = q.shape[2] // k.shape[2]
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    qc, kc, vc = leaves
    out = F.scaled_dot_product_attention(qc.transpose(1, 2), kc.repeat_interleave(rep, 2).transpose(1, 2),
                                         vc.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    out.backward(grad.to(dtype))
    return out, leaves


@pytest.mark.gpu
@needs_flash4
@pytest.mark.parametrize("batch, seq, heads, kv_heads, head_dim", [
    (2, 1000, 4, 4, 64),  # a length that is no multiple of the kernels' tiles
    (1, 512, 8, 2, 128),  # grouped-query attention, the 1.3B presets' head size
    (3, 17, 2, 1, 64),
])
def test_gpu_flash4_matches_fp32_attention_as_closely_as_sdpa(batch, seq, heads, kv_heads, head_dim):
    torch.manual_seed(0)
    q = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, seq, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    ref, leaves = _sdpa(q, k, v, grad, torch.float32)
    sd, sd_leaves = _sdpa(q, k, v, grad, torch.bfloat16)
    out = fa.flash_attention(q, k, v)
    out.backward(grad)
    for name, got, base, exact in zip(("out", "dq", "dk", "dv"), [out, q.grad, k.grad, v.grad],
                                      [sd] + [t.grad for t in sd_leaves], [ref] + [t.grad for t in leaves]):
        err = (got.float() - exact).abs().max().item()
        sdpa_err = (base.float() - exact).abs().max().item()
        assert err <= 2 * sdpa_err + 1e-3, (name, err, sdpa_err)


@pytest.mark.gpu
@needs_flash4
def test_gpu_flash4_compiles_into_one_graph_and_matches_eager():
    torch.manual_seed(0)
    layer = Attention(128, 4, 2, backend="flash4").cuda()
    x = torch.randn(2, 256, 128, device="cuda", requires_grad=True)
    from model.rope import RotaryEmbedding

    rope = RotaryEmbedding(32, 256).cuda()
    rope.reset_parameters()
    cos, sin = rope(torch.arange(256, device="cuda").expand(2, 256))
    outs = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):  # fullgraph: a graph break is an error
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, cos, sin)
        y.float().square().mean().backward()
        outs.append((y.detach(), x.grad.clone(), layer.wq.weight.grad.clone()))
        x.grad = None
        layer.zero_grad()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_flash4
def test_gpu_flash4_ops_pass_opcheck_and_deterministic_mode_repeats_bits():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.mnemo.flash4_forward.default, (q, k, v))
    grad = torch.randn_like(q)
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            for t in (q, k, v):
                t.grad = None
            fa.flash_attention(q, k, v).backward(grad)
            runs.append([t.grad.clone() for t in (q, k, v)])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_flash4
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_gpu_flash4_under_activation_checkpointing_gives_the_gradients_without_it(scope):
    # the trainer's order (compile, then checkpointing around each compiled block): the recomputed forward calls the
    # flash4 op again; the loss repeats bit for bit, the gradients up to the backward's atomic-add order
    import copy

    from train.parallelize import apply_activation_checkpointing, apply_compile

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, max_seq_len=256, attention_backend="flash4")
    plain = Transformer(cfg).cuda()
    checkpointed = copy.deepcopy(plain)
    apply_compile(plain, scope)
    apply_compile(checkpointed, scope)
    apply_activation_checkpointing(checkpointed)
    tokens = torch.randint(0, 512, (2, 256), device="cuda")
    losses, grads = [], []
    for model in (plain, checkpointed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        losses.append(loss.detach())
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and g.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-2, atol=1e-2 * g.abs().max().item(), msg=name)
