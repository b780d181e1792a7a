"""The FLOP counter against independent counts: the parameters of a built model (6N + 12LDS) and a hand count."""
import torch
from torch import nn

from model import ModelConfig, Transformer
from model.config import MemoryConfig
from model.flops import flops_per_token


def _linear_weights(model: nn.Module, skip=()) -> int:
    return sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip)


def test_dense_count_is_6n_plus_12lds():
    cfg = ModelConfig(vocab_size=1000, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, multiple_of=32)
    with torch.device("meta"):
        model = Transformer(cfg)
    S = 64
    expected = 6 * _linear_weights(model) + 12 * cfg.n_layers * cfg.dim * S
    assert flops_per_token(cfg, S).total == expected


def test_tied_output_still_costs_its_product():
    tied = ModelConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, tie_embeddings=True)
    untied = ModelConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, tie_embeddings=False)
    assert flops_per_token(tied, 32) == flops_per_token(untied, 32)
    assert flops_per_token(tied, 32).output == 6 * 64 * 1000


def test_memory_layer_by_hand():
    memory = MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4, k_dim=16, swilu=True)
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, ffn_dim=96, memory=memory)
    count = flops_per_token(cfg, seq_len=10)
    # forward per token, then x3 for training
    assert count.memory_query == 3 * 2 * 32 * (2 * 16)  # dim -> heads * k_dim
    assert count.memory_search == 3 * 2 * 2 * 8 * 16  # 2 heads x (two halves of 8 keys of size 8) x 2 FLOPs
    assert count.memory_lookup == 3 * 2 * 2 * 4 * 32  # 2 heads x knn 4 rows of v_dim 32
    assert count.memory_proj == 3 * (2 * 32 * 32 + 2 * 32 * 32)  # value_proj + swilu_proj
    assert count.ffn == 3 * 1 * 2 * 3 * 32 * 96  # one SwiGLU block left
    assert count.attention == 3 * 2 * 2 * 32 * (4 * 32)  # 2 layers, q k v o at full width
    assert count.attention_scores == 3 * 2 * 4 * 10 * 32
    assert count.output == 3 * 2 * 32 * 100
    assert count.total == sum(v for k, v in count.as_dict().items() if k not in ("memory", "total"))


def test_memory_linear_params_are_counted_but_values_are_not():
    memory = MemoryConfig(layers=[0, 2], n_keys=16, heads=2, knn=4, k_dim=16)
    cfg = ModelConfig(vocab_size=500, dim=64, n_layers=3, n_heads=4, memory=memory)
    with torch.device("meta"):
        model = Transformer(cfg)
    S = 32
    count = flops_per_token(cfg, S)
    dense_part = 6 * _linear_weights(model) + 12 * cfg.n_layers * cfg.dim * S
    assert count.total == dense_part + count.memory_search + count.memory_lookup
    # a bigger table (n_keys^2 rows) costs only its larger sub-key search
    bigger = ModelConfig(vocab_size=500, dim=64, n_layers=3, n_heads=4,
                         memory=MemoryConfig(layers=[0, 2], n_keys=64, heads=2, knn=4, k_dim=16))
    grown = flops_per_token(bigger, S)
    assert grown.total - count.total == grown.memory_search - count.memory_search == 4 * count.memory_search - count.memory_search
