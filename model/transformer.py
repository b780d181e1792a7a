"""Llama-style decoder: token embedding, pre-norm blocks (attention + SwiGLU FFN or memory layer), final norm."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import ops

from .attention import Attention, KVCache
from .config import ModelConfig
from .ffn import FeedForward
from .init import init_module
from .memory import CastTable, MemoryLayer, ValuePool, table_for_forward, value_pool
from .norms import RMSNorm
from .rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, use_memory: bool):
        super().__init__()
        self.layer_id = layer_id
        keep = cfg.residual_dtype != "fp32"  # a low-precision residual stream's norms write its dtype
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, keep_dtype=keep)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.attention_backend)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, keep_dtype=keep)
        # A memory block's FFN slot holds the memory layer (`layers.{i}.memory`), others a SwiGLU
        # (`layers.{i}.feed_forward`); with model.memory.keep_ffn a memory block holds both, side by side.
        if use_memory:
            self.memory = MemoryLayer(cfg, own_values=not cfg.memory.share_values)
        if not use_memory or cfg.memory.keep_ffn:
            self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    @property
    def is_memory(self) -> bool:
        return hasattr(self, "memory")

    @property
    def has_ffn(self) -> bool:
        return hasattr(self, "feed_forward")

    def forward(self, x, cos, sin, mask=None, cache=None, start_pos=0, pool: Optional[ValuePool] = None):
        """`pool`: the shared value table's module, or a CastTable of it (None: the memory layer uses its own table).

        The module, not its weight, is passed in: FSDP2 hooks every tensor input of a sharded block that needs a
        gradient, and a (column-sharded DTensor) value table seen as an input of every block would get one such
        hook per block; the unused ones then hand back plain-tensor zero gradients that cannot be added to the
        DTensor gradient (and cost a table-sized add each).
        """
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, self.layer_id, start_pos)
        normed = self.ffn_norm(h)
        if not self.is_memory:
            return h + self.feed_forward(normed)
        out = h + self.memory(normed, pool.weight if pool is not None else None)
        if self.has_ffn:  # memory beside the FFN: both read the same normed input
            out = out + self.feed_forward(normed)
        return out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate("model")
        self.cfg = cfg
        memory_layers = set(cfg.memory.resolved_layers(cfg.n_layers))
        # Module constructors draw default inits from the RNG; fork it so that only init_weights() consumes it.
        # Then eager construction equals meta construction + to_empty + init_weights under the same seed.
        device = torch.empty(0).device  # honours `with torch.device(...)`
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            shared = bool(memory_layers) and cfg.memory.share_values
            self.values = value_pool(cfg) if shared else None
            self.layers = nn.ModuleList(Block(cfg, i, i in memory_layers) for i in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps, keep_dtype=cfg.residual_dtype != "fp32")
            self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer from the torch RNG (see model/init.py)."""
        init_module(self, self.cfg.init_std)

    def make_kv_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        cfg = self.cfg
        if device is None:
            device = self.tok_embeddings.weight.device
        if dtype is None:
            dtype = self.tok_embeddings.weight.dtype
        return KVCache(cfg.n_layers, batch_size, max_len, cfg.kv_heads, cfg.head_dim, device, dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: Optional[KVCache] = None,
        start_pos: int = 0,
        positions: Optional[torch.Tensor] = None,
        key_valid: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tokens [B, L] -> logits [B, L, vocab]; with targets [B, L], the mean next-token cross-entropy instead.

        cache: KV cache from make_kv_cache; tokens are written at cache positions start_pos..start_pos+L.
        positions [B, L]: RoPE positions (default start_pos + arange(L)); left-padded batches pass their own.
        key_valid [B, S] bool (S = start_pos + L with a cache, else L): False marks padding keys.
        targets: the loss is computed chunk by chunk with the output projection (ops.linear_cross_entropy), so the
        full logits (tokens x vocab, in fp32 for the loss) never exist: less memory and memory traffic.
        """
        B, L = tokens.shape
        device = tokens.device
        max_len = self.cfg.max_seq_len
        if positions is None:
            if start_pos < 0 or start_pos + L > max_len:
                raise ValueError(f"Transformer: positions [{start_pos}, {start_pos + L}) exceed model.max_seq_len={max_len}")
            positions = (start_pos + torch.arange(L, device=device)).expand(B, L)
        elif positions.shape != (B, L):
            raise ValueError(f"Transformer: positions must be [B, L] = {(B, L)}, got {tuple(positions.shape)}")
        elif positions.device.type == "cpu" and (positions.min() < 0 or positions.max() >= max_len):
            # checked on CPU only: on GPU the check would sync every step
            raise ValueError(f"Transformer: positions must be in [0, model.max_seq_len={max_len})")
        mask = self._attention_mask(B, L, start_pos if cache is not None else 0, key_valid, cache is not None, device)
        cos, sin = self.rope(positions)
        h = self._residual_cast(self.tok_embeddings(tokens))
        pool = self.values
        if pool is not None:
            m = self.cfg.memory
            reads = B * L * m.heads * m.knn * len(m.resolved_layers(self.cfg.n_layers))
            table = table_for_forward(pool.weight, reads, m.cast_values)
            if table is not pool.weight:
                pool = CastTable(table)  # cast once per forward, shared by every memory layer
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, start_pos, pool)
        h = self.norm(h)
        # tied: the embedding table is the output matrix
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        if targets is not None:
            return ops.linear_cross_entropy(h.reshape(B * L, -1), weight, targets.reshape(B * L))
        return F.linear(h, weight)

    def _residual_cast(self, h: torch.Tensor) -> torch.Tensor:
        """The embedding output in the residual stream's dtype (model.residual_dtype). Blocks keep it: their
        branches end in autocast matmuls (bf16) and their norms keep the input dtype."""
        device = h.device.type
        if self.cfg.residual_dtype == "autocast" and torch.is_autocast_enabled(device):
            return h.to(torch.get_autocast_dtype(device))
        return h

    @staticmethod
    def _attention_mask(B, L, offset, key_valid, cached, device) -> Optional[torch.Tensor]:
        """Bool [B, 1, L, S] (True = attend) over key positions 0..S-1, S = offset + L; None = plain causal.

        Query i sits at key position offset + i and sees keys j <= offset + i that are valid. It always sees
        itself, so a padding query never has an empty row: softmax over no keys is NaN on some SDPA backends,
        and NaN in a pad position's hidden state would leak into real tokens through 0 * NaN in later layers.
        """
        S = offset + L
        if key_valid is None and not cached:
            return None
        q_pos = offset + torch.arange(L, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None].expand(B, 1, L, S)
        if key_valid is not None:
            if key_valid.shape != (B, S):
                raise ValueError(f"Transformer: key_valid must be [B, start_pos + L] = {(B, S)}, got {tuple(key_valid.shape)}")
            mask = mask & (key_valid.bool()[:, None, None, :] | (k_pos == q_pos)[None, None])
        return mask

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a shared table counts once); exclude_embeddings drops the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n
