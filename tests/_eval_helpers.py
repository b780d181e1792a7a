"""The tiny model the eval tests score with (byte vocabulary, one reference memory layer)."""
import torch

from model import MemoryConfig, ModelConfig, Transformer


def tiny_model(seed=0, memory=True, max_seq_len=64, weight_scale=8.0):
    mem = MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4, k_dim=16, backend="reference") if memory else MemoryConfig()
    cfg = ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      max_seq_len=max_seq_len, memory=mem)
    torch.manual_seed(seed)
    m = Transformer(cfg)
    # The default init gives near-uniform logits; larger weights make the logits depend strongly on the
    # input, so a wrong position or mask would change them (the comparisons can fail).
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(weight_scale)
    return m.eval()
