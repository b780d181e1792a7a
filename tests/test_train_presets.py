"""Every preset builds on the meta device, and its parameter count matches the architecture's arithmetic."""
import glob
import os

import pytest
import torch

from model import Transformer
from train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_parameters(m) -> int:
    """Count from the architecture: Llama blocks, SwiGLU FFNs replaced by Memory+ at the memory layers."""
    d, hd = m.dim, m.dim // m.n_heads
    kv = (m.n_kv_heads or m.n_heads) * hd
    ffn = m.ffn_dim or m.multiple_of * -(-int(8 * d / 3) // m.multiple_of)
    mem = m.memory
    layers = set(mem.resolved_layers(m.n_layers))
    v_dim = mem.v_dim or d
    attn = d * d + 2 * d * kv + d * d
    memory_layer = (
        d * mem.heads * mem.k_dim + mem.heads * mem.k_dim  # query projection with bias
        + mem.heads * 2 * mem.n_keys * (mem.k_dim // 2)  # product sub-keys
        + (d * v_dim if mem.swilu else 0)  # swilu input projection
        + v_dim * d  # value projection
    )
    total = m.vocab_size * d * (1 if m.tie_embeddings else 2) + d  # embeddings, output, final norm
    for i in range(m.n_layers):
        total += attn + 2 * d + (memory_layer if i in layers else 3 * d * ffn)
    n_tables = 1 if (mem.share_values or len(layers) <= 1) else len(layers)
    return total + (n_tables * mem.n_keys ** 2 * v_dim if layers else 0)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_preset_parameter_count(path):
    cfg = load_config(path).model
    with torch.device("meta"):
        model = Transformer(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == counted
    # small extras (learnable qk-norm scales, a gate) are allowed; anything structural is not
    assert abs(counted - expected_parameters(cfg)) <= 0.001 * counted, (counted, expected_parameters(cfg))


def test_paper_scale_presets_have_paper_sizes():
    dense = load_config(os.path.join(ROOT, "configs", "dense_373m.yaml")).model
    mem = load_config(os.path.join(ROOT, "configs", "memory_373m.yaml")).model
    with torch.device("meta"):
        d, m = Transformer(dense), Transformer(mem)
    assert 360e6 < d.num_parameters() < 390e6
    values = dict(m.named_parameters())["values.weight"]
    assert tuple(values.shape) == (1024 ** 2, 1024)  # one shared 1M x 1024 table
    assert m.num_parameters() - values.numel() < d.num_parameters()  # memory replaces FFNs
