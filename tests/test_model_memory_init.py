"""Memory output projections: fan-in init (std = input size ** -0.5) or the model's init_std."""
import torch

from model import MemoryConfig, ModelConfig, Transformer


def build(proj_init, swilu=True):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, multiple_of=16, memory=MemoryConfig(
        layers=[1], n_keys=8, heads=2, knn=4, k_dim=8, v_dim=48, swilu=swilu, proj_init=proj_init)))


def test_fan_in_scales_only_the_memory_projections():
    small, fan_in = build("init_std"), build("fan_in")
    mem_small, mem_fan = small.layers[1].memory, fan_in.layers[1].memory
    # Same draws in the same order: the projections differ by the ratio of stds, nothing else differs.
    for name, in_features in (("swilu_proj", 32), ("value_proj", 48)):
        a, b = getattr(mem_small, name).weight, getattr(mem_fan, name).weight
        torch.testing.assert_close(b, a * (in_features ** -0.5 / 0.02), rtol=1e-5, atol=0)
        assert abs(b.std().item() - in_features ** -0.5) < 0.2 * in_features ** -0.5
    projections = {"layers.1.memory.swilu_proj.weight", "layers.1.memory.value_proj.weight"}
    for (name, p), q in zip(small.named_parameters(), fan_in.parameters()):
        if name not in projections:
            assert torch.equal(p, q), name


def test_plain_memory_has_only_the_value_projection():
    model = build("fan_in", swilu=False)
    assert abs(model.layers[1].memory.value_proj.weight.std().item() - 48 ** -0.5) < 0.2 * 48 ** -0.5
