"""The facts experiment's dense baseline has at least the memory model's training FLOPs, and no more than needed."""
import os
import sys

import pytest

from model.flops import flops_per_token
from train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.facts_experiment import matched_dense  # noqa: E402


@pytest.mark.parametrize("extra", [[], ["model.memory.n_keys=256", "model.memory.k_dim=64"], ["model.n_layers=4", "model.memory.layers=[1,3]"],
                                   ["model.memory.keep_ffn=true"]])
def test_matched_dense_is_the_smallest_width_at_or_above_the_memory_flops(extra):
    config = os.path.join(ROOT, "configs", "facts_small.yaml")
    memory = load_config(config, extra)
    overrides = matched_dense(memory)
    dense = load_config(config, extra + overrides)
    assert dense.model.memory.resolved_layers(dense.model.n_layers) == []
    target = flops_per_token(memory.model, memory.data.seq_len).total
    assert flops_per_token(dense.model, dense.data.seq_len).total >= target
    narrower = load_config(config, extra + overrides[:-1] + [f"model.ffn_dim={dense.model.ffn_dim - dense.model.multiple_of}"])
    assert dense.model.ffn_dim == dense.model.multiple_of or flops_per_token(narrower.model, narrower.data.seq_len).total < target
