"""Training FLOPs per token of a model config, by part: the one FLOP count behind MFU, matched-FLOP baselines and
loss-against-compute plots.

Conventions (the usual "6N + 12·L·D·S" count, extended to memory layers):
- a matrix product of a token's [a] vector with an [a, b] matrix costs 2·a·b forward and twice that backward, so
  training costs 3x the forward count;
- attention scores and the weighted sum over values cost 2·S·D each forward per layer, counted over the whole
  sequence S as if not causal (as PaLM and most MFU reports do, so numbers compare across frameworks);
- the input embedding is a gather and costs nothing; the output projection is counted (tied or not);
- a memory layer costs its query projection, its sub-key scores (2·n_keys·k_dim per head: two halves of
  n_keys keys of k_dim/2), its lookup (a weighted sum of heads·knn value rows, backward likewise a scatter), and its
  output projections. The value table itself is not in "6N": a token touches heads·knn rows, not all of it.
  A memory block that keeps its FFN (model.memory.keep_ffn) costs both its SwiGLU and its memory layer.
Norms, RoPE, softmax, top-k and other elementwise work are left out, as in the usual count.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict

from .config import ModelConfig

TRAIN_FACTOR = 3  # forward + backward (two products per forward product) of every matrix product


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs (forward + backward) per token, by part, for one sequence length."""

    attention: int = 0  # q, k, v, o projections
    attention_scores: int = 0  # QK^T and the weighted sum of values
    ffn: int = 0  # SwiGLU blocks (with keep_ffn also those beside the memory layers)
    memory_query: int = 0  # query projections of the memory layers
    memory_search: int = 0  # sub-key scores
    memory_lookup: int = 0  # weighted sums of the selected value rows
    memory_proj: int = 0  # swilu and output projections (and the gate) of the memory layers
    output: int = 0  # final projection to the vocabulary

    @property
    def total(self) -> int:
        return sum(dataclasses.asdict(self).values())

    @property
    def memory(self) -> int:
        return self.memory_query + self.memory_search + self.memory_lookup + self.memory_proj

    def as_dict(self) -> Dict[str, int]:
        return {**dataclasses.asdict(self), "memory": self.memory, "total": self.total}


def _memory_layer_forward(cfg: ModelConfig) -> Dict[str, int]:
    m = cfg.memory
    proj = 2 * cfg.v_dim * cfg.dim  # value_proj
    if m.swilu:
        proj += 2 * cfg.dim * cfg.v_dim
    if m.gate:
        proj += 2 * cfg.dim
    return {
        "memory_query": 2 * cfg.dim * m.heads * m.k_dim,
        "memory_search": m.heads * 2 * (2 * m.n_keys * (m.k_dim // 2)),
        "memory_lookup": 2 * m.heads * m.knn * cfg.v_dim,
        "memory_proj": proj,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopCount:
    """Training FLOPs per token of `cfg` on rows of `seq_len` tokens."""
    kv_dim = cfg.kv_heads * cfg.head_dim
    n_memory = len(cfg.memory.resolved_layers(cfg.n_layers))
    n_ffn = cfg.n_layers if cfg.memory.keep_ffn else cfg.n_layers - n_memory  # keep_ffn: memory beside the FFN
    forward = {
        "attention": cfg.n_layers * 2 * cfg.dim * (2 * cfg.dim + 2 * kv_dim),
        "attention_scores": cfg.n_layers * 2 * 2 * seq_len * cfg.dim,
        "ffn": n_ffn * 2 * 3 * cfg.dim * cfg.hidden_dim,
        "output": 2 * cfg.dim * cfg.vocab_size,
    }
    if n_memory:
        for key, value in _memory_layer_forward(cfg).items():
            forward[key] = n_memory * value
    return FlopCount(**{key: TRAIN_FACTOR * value for key, value in forward.items()})
