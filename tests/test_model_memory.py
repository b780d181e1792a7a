"""Memory layer: gradients (gradcheck), shared value pool semantics, per-model ownership."""
import pytest
import torch
from torch.func import functional_call

from model import MemoryConfig, MemoryLayer, ModelConfig, Transformer, ValuePool
from model.init import init_module
from ops import reference as ops_reference


def _layer_cfg(**mem):
    m = dict(layers=[0], n_keys=4, heads=2, knn=3, k_dim=4, share_values=False)
    m.update(mem)
    return ModelConfig(vocab_size=11, dim=6, n_layers=1, n_heads=2, memory=MemoryConfig(**m))


@pytest.mark.parametrize(
    "mem", [dict(), dict(swilu=False, qk_norm=False), dict(gate=True, v_dim=5)], ids=["memory+", "plain", "gate"]
)
def test_memory_layer_gradcheck(mem):
    torch.manual_seed(0)
    layer = MemoryLayer(_layer_cfg(**mem), own_values=True).double()
    init_module(layer, std=0.5)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters())
    assert {"query_proj.weight", "query_proj.bias", "keys1", "keys2", "values.weight", "value_proj.weight"} <= set(names)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-5)


def _model_cfg(**mem):
    m = dict(layers=[0, 2], n_keys=6, heads=2, knn=4, k_dim=8)
    m.update(mem)
    return ModelConfig(vocab_size=31, dim=16, n_layers=3, n_heads=2, max_seq_len=32, memory=MemoryConfig(**m))


def test_shared_values_single_tensor_and_accumulated_grads():
    torch.manual_seed(0)
    model = Transformer(_model_cfg())
    keys = [k for k in model.state_dict() if "values" in k]
    assert keys == ["values.weight"]
    assert all(getattr(b, "memory", None) is None or b.memory.values is None for b in model.layers)
    tokens = torch.randint(0, 31, (2, 7))
    model(tokens).square().mean().backward()
    total = model.values.weight.grad

    # Same forward, but each memory layer reads its own leaf copy of the table: the shared gradient must be
    # the sum of the per-layer gradients.
    copies = {}
    positions = torch.arange(7).expand(2, 7)
    cos, sin = model.rope(positions)
    h = model.tok_embeddings(tokens)
    for i, block in enumerate(model.layers):
        v = None
        if hasattr(block, "memory"):
            v = ValuePool(*model.values.weight.shape, init_std=0.0)
            v.weight = torch.nn.Parameter(model.values.weight.detach().clone())
            copies[i] = v.weight
        h = block(h, cos, sin, pool=v)
    model.output(model.norm(h)).square().mean().backward()
    assert sorted(copies) == [0, 2]
    per_layer = [copies[i].grad for i in sorted(copies)]
    assert all(g.abs().sum() > 0 for g in per_layer)
    torch.testing.assert_close(total, per_layer[0] + per_layer[1])


def test_unshared_values_per_layer():
    torch.manual_seed(0)
    model = Transformer(_model_cfg(share_values=False))
    keys = [k for k in model.state_dict() if "values" in k]
    assert keys == ["layers.0.memory.values.weight", "layers.2.memory.values.weight"]
    assert model.values is None


def test_each_model_owns_its_table():
    torch.manual_seed(0)
    a = Transformer(_model_cfg())
    torch.manual_seed(1)
    b = Transformer(_model_cfg())
    assert a.values.weight.data_ptr() != b.values.weight.data_ptr()
    tokens = torch.randint(0, 31, (1, 5))
    before = b(tokens)
    with torch.no_grad():
        a.values.weight.zero_()
    torch.testing.assert_close(b(tokens), before)  # b untouched by a's table
    assert not torch.equal(a(tokens), before)


def test_value_grad_touches_only_read_rows():
    torch.manual_seed(0)
    model = Transformer(_model_cfg(n_keys=16, knn=2, heads=1))
    model(torch.randint(0, 31, (1, 3))).sum().backward()
    rows_with_grad = (model.values.weight.grad.abs().sum(1) > 0).sum().item()
    assert 0 < rows_with_grad <= 2 * 3 * 2  # memory layers x tokens x knn


def test_bf16_values_in_fp32_model():
    torch.manual_seed(0)
    model = Transformer(_model_cfg())
    model.values.to(torch.bfloat16)
    out = model(torch.randint(0, 31, (2, 4)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_value_plan_does_the_lookup():
    """A layer with a value plan reads through it (how the value table split over ranks is read)."""
    torch.manual_seed(0)
    model = Transformer(_model_cfg())
    tokens = torch.randint(0, 31, (1, 4))
    want = model(tokens)
    calls = []

    class SpyPlan:
        def lookup(self, indices, weights, values, backend):
            calls.append((indices.shape, backend))
            return ops_reference.memory_lookup(indices, weights, values)

    for block in model.layers:
        if hasattr(block, "memory"):
            block.memory.value_plan = SpyPlan()
    torch.testing.assert_close(model(tokens), want)
    assert calls == [((4, 2 * 4), "auto")] * 2  # two memory layers, 4 tokens, heads * knn slots


def test_prepare_memory_kernels_asks_ops_for_the_memory_layers_settings(monkeypatch):
    import ops
    from model import prepare_memory_kernels

    calls = []
    monkeypatch.setattr(ops, "prepare_search", lambda *a: calls.append(a) or "search ready")
    monkeypatch.setattr(ops, "prepare_pair_sort", lambda *a: calls.append(a) or "sort ready")
    dense = ModelConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2)
    assert prepare_memory_kernels(dense, "cuda", torch.bfloat16) is None and calls == []  # no memory layer
    cfg = ModelConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2,
                      memory=MemoryConfig(layers=[1], n_keys=64, knn=16, backend="triton"))
    assert prepare_memory_kernels(cfg, "cuda", torch.bfloat16) == "search ready\nsort ready"
    assert calls == [("cuda", torch.bfloat16, 16, 64, "triton"), ("cuda", "triton")]
    assert prepare_memory_kernels(cfg, "cuda", torch.bfloat16, backward=False) == "search ready"  # evaluation
    assert len(calls) == 3
    monkeypatch.setattr(ops, "prepare_search", lambda *a: None)  # neither used (a CPU run): no line
    monkeypatch.setattr(ops, "prepare_pair_sort", lambda *a: None)
    assert prepare_memory_kernels(cfg, "cpu", None) is None
