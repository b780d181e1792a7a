"""Product-key memory layer (Memory+) and its value table.

Per token x (the block's normed hidden state):
  q = W_q x + b, split into `heads` queries of k_dim, each split into two halves;
  per head: exact top-knn over n_keys**2 slots of the product keys (ops.product_key_search);
  w = softmax over each head's knn scores (fp32); y = sum over the heads*knn bag of w * V[slot];
  out = value_proj(y * silu(swilu_proj x))  (swilu)  or  value_proj(y)  (plain);  optional sigmoid gate.

qk-norm (our choice, the paper gives no details): each query half is RMS-normalised with a learnable gain
(`query_norm.weight`, shared by heads and halves); each sub-key row is normalised to unit L2 norm without
parameters. A query half then has norm sqrt(k_dim/2) and a score half is sqrt(k_dim/2) * cosine: for random
directions about N(0, 1), like scaled dot-product attention, and the gain can sharpen the softmax later.

The value table is a ValuePool. With shared values, one pool lives on the Transformer (`values.weight`) and is
passed into forward; the layer then holds no table of its own. Split over ranks, the tables and the layers carry
their parallel plan (model/value_parallel.py). No class-level or global state.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import ops

from .config import ModelConfig
from .norms import RMSNorm


class ValuePool(nn.Module):
    """The memory's value table [n_slots, v_dim] (state-dict name `<owner>.values.weight`).

    `plan`: how the table is split over ranks (a model.value_parallel.ColumnParallelValues), None when one device
    holds all of it. Value parameters are found by this type (value_parameters), never by name.
    """

    def __init__(self, n_slots: int, v_dim: int, init_std: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(n_slots, v_dim, dtype=dtype))
        self.plan = None

    def reset_parameters(self) -> None:
        if self.weight.dtype == torch.float32:
            nn.init.normal_(self.weight, std=self.init_std)
        else:
            # Drawn in fp32 and rounded: the same random stream, and the same table up to rounding, as the fp32 pool.
            with torch.no_grad():
                self.weight.copy_(torch.empty(self.weight.shape, device=self.weight.device).normal_(std=self.init_std))


def value_pools(model: nn.Module) -> List[ValuePool]:
    """Every value table of `model`, in registration order (wrappers of compile or checkpointing included)."""
    return [m for m in model.modules() if isinstance(m, ValuePool)]


def value_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The value-table parameters of `model` (once each, in registration order): the one test of "is a value"
    for optimizer groups, gradient-norm parts, trainable modes and sharding."""
    return [pool.weight for pool in value_pools(model)]


def memory_layers(model: nn.Module) -> List["MemoryLayer"]:
    return [m for m in model.modules() if isinstance(m, MemoryLayer)]


class SlotUsage:
    """Reads per value row of one memory layer, accumulated on the layer's device during training.

    Counting is an index_add_ into a device tensor (no host sync per step); `read()` syncs once, at log time.
    Not module state: not in the state dict, nothing changes for checkpoints.
    """

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.counts: Optional[torch.Tensor] = None  # reads per row in the current window
        self.ever: Optional[torch.Tensor] = None  # rows read at least once since tracking began
        # keep_last: also keep the latest forward's slots [tokens, heads * knn] in `last` (scripts/capture_slots.py:
        # kernel benchmarks on the rows a training step really reads)
        self.keep_last = False
        self.last: Optional[torch.Tensor] = None

    @torch.compiler.disable  # attribute mutation: keep it out of compiled graphs (a break only when tracking)
    def add(self, slots: torch.Tensor) -> None:
        if self.keep_last:
            self.last = slots.detach().reshape(slots.shape[0], -1).clone()
        flat = slots.detach().reshape(-1)
        if self.counts is None or self.counts.device != flat.device:
            self.counts = torch.zeros(self.n_slots, dtype=torch.int64, device=flat.device)
            self.ever = torch.zeros(self.n_slots, dtype=torch.bool, device=flat.device)
        self.counts.index_add_(0, flat, torch.ones_like(flat))

    def read(self) -> Dict[str, float]:
        """Window statistics, then a new window: rows_read (fraction of rows read in the window), entropy (nats,
        of the distribution of reads over rows) and entropy_frac (entropy / log n_slots: 1 = uniform use),
        dead (fraction of rows never read since tracking began), reads (reads in the window). {} before any read."""
        if self.counts is None:
            return {}
        counts = self.counts.to(torch.float64)
        self.ever |= self.counts > 0
        total = counts.sum()
        p = counts / total.clamp(min=1)
        entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
        stats = torch.stack([(counts > 0).double().mean(), entropy, entropy / math.log(max(self.n_slots, 2)),
                             (~self.ever).double().mean(), total]).tolist()
        self.counts.zero_()
        return dict(zip(("rows_read", "entropy", "entropy_frac", "dead", "reads"), stats))


class CastTable:
    """Stands in for a ValuePool during one forward: `weight` is the table already cast to the compute dtype.

    A plain object, not a tensor or module, so FSDP hooks see no extra block input (see Block.forward)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def table_for_forward(weight: torch.Tensor, rows_read: int, enabled: bool = True) -> torch.Tensor:
    """The value table as this forward's lookups should read it.

    Under autocast with gradients, when the lookups read at least as many rows as the table holds, the fp32
    table is cast to the autocast dtype once: lookups then read half the bytes forward and backward, and the
    per-layer dense value gradients are half-size (summed over layers in that dtype, as autocast does for any
    weight used by several products, then cast back once to the fp32 parameter). Small reads (decoding, evaluation)
    keep the fp32 table: a cast would cost more than it saves. Column-sharded (DTensor) tables are left alone.
    enabled=False (model.memory.cast_values) always keeps the fp32 table.
    """
    device = weight.device.type
    if (enabled and weight.dtype == torch.float32 and torch.is_grad_enabled() and torch.is_autocast_enabled(device)
            and rows_read >= weight.shape[0] and not _is_dtensor(weight)):
        return ops.cast_table(weight, torch.get_autocast_dtype(device))
    return weight


# Eager even inside a compiled block: the backward writes the table's .grad, a side effect outside the graph.
@torch.compiler.disable
def _lookup_into_grad(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, backend: str,
                      merge: bool) -> torch.Tensor:
    """The lookup adding its value gradient into table.grad (ops.memory_lookup_into_grad) when the table allows it
    (a leaf parameter without hooks, not sharded), else the plain lookup."""
    if ops.can_accumulate(table):
        return ops.memory_lookup_into_grad(indices, weights, table, backend, merge=merge)
    return ops.memory_lookup(indices, weights, table, backend=backend)


def value_init_std(cfg: ModelConfig) -> float:
    m = cfg.memory
    return m.value_init_std if m.value_init_std is not None else cfg.v_dim ** -0.5


def value_pool(cfg: ModelConfig) -> ValuePool:
    """The value table `cfg` describes (n_keys**2 rows of v_dim, in model.memory.value_dtype)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.memory.value_dtype]
    return ValuePool(cfg.memory.n_keys**2, cfg.v_dim, value_init_std(cfg), dtype)


def prepare_memory_kernels(cfg: ModelConfig, device, autocast_dtype: Optional[torch.dtype],
                           backward: bool = True) -> Optional[str]:
    """Build (or load) now the compiled kernels this model's memory layers will call on `device` under
    `autocast_dtype` (ops.prepare_search; with `backward`, for training, also ops.prepare_pair_sort), so that no
    first step waits on a build. Lines for the log, or None when none is used."""
    memory = cfg.memory
    if not memory.resolved_layers(cfg.n_layers):
        return None
    notes = [ops.prepare_search(device, autocast_dtype, memory.knn, memory.n_keys, memory.backend),
             ops.prepare_pair_sort(device, memory.backend) if backward else None]
    return "\n".join(note for note in notes if note) or None


def _unit_rows(keys: torch.Tensor, eps: float) -> torch.Tensor:
    """Sub-key rows scaled to unit L2 norm, computed in fp32 (fp64 stays fp64)."""
    acc = torch.promote_types(keys.dtype, torch.float32)
    return F.normalize(keys.to(acc), dim=-1, eps=eps).to(keys.dtype)


class MemoryLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, own_values: bool):
        super().__init__()
        m = cfg.memory
        self.heads, self.k_dim, self.knn, self.n_keys = m.heads, m.k_dim, m.knn, m.n_keys
        self.qk_norm, self.backend, self.eps = m.qk_norm, m.backend, cfg.norm_eps
        self.proj_init = m.proj_init
        self.cast_values = m.cast_values
        # Only a table stored in low precision: an fp32 table read through its per-forward bf16 cast keeps the
        # plain lookup (no graph break inside the compiled block for a path that could not accumulate anyway).
        self.accumulate_value_grad = m.accumulate_value_grad and m.value_dtype != "float32"
        self.merge_value_grads = m.merge_value_grads and m.share_values and len(m.resolved_layers(cfg.n_layers)) > 1
        half = m.k_dim // 2
        self.query_proj = nn.Linear(cfg.dim, m.heads * m.k_dim, bias=True)
        self.query_norm = RMSNorm(half, cfg.norm_eps) if m.qk_norm else None
        self.keys1 = nn.Parameter(torch.empty(m.heads, m.n_keys, half))
        self.keys2 = nn.Parameter(torch.empty(m.heads, m.n_keys, half))
        self.values = value_pool(cfg) if own_values else None
        self.swilu_proj = nn.Linear(cfg.dim, cfg.v_dim, bias=False) if m.swilu else None
        self.value_proj = nn.Linear(cfg.v_dim, cfg.dim, bias=False)
        self.gate = nn.Linear(cfg.dim, 1, bias=False) if m.gate else None
        # How lookups read a table split over ranks (model/value_parallel.py); None: the table is whole here.
        self.value_plan = None
        # Slot-read statistics (memory health), counted in training forwards once track_usage() is called.
        self.usage: Optional[SlotUsage] = None

    def track_usage(self) -> SlotUsage:
        if self.usage is None:
            self.usage = SlotUsage(self.n_keys**2)
        return self.usage

    def reset_parameters(self) -> None:
        """Own parameters only (sub-keys); submodules are initialised by Transformer.init_weights."""
        bound = 1.0 / math.sqrt(self.k_dim // 2)
        nn.init.uniform_(self.keys1, -bound, bound)
        nn.init.uniform_(self.keys2, -bound, bound)

    def search_parameters(self) -> List[nn.Parameter]:
        """The parameters that choose which rows are read: sub-keys, query projection, query norm."""
        parts = [self.query_proj] + ([self.query_norm] if self.query_norm is not None else [])
        return [self.keys1, self.keys2] + [p for m in parts for p in m.parameters()]

    def projection_init_stds(self) -> Dict[nn.Linear, float]:
        """Init std of the output-side projections when they differ from the model's (see MemoryConfig.proj_init)."""
        if self.proj_init != "fan_in":
            return {}
        projs = [p for p in (self.swilu_proj, self.value_proj) if p is not None]
        return {p: p.in_features ** -0.5 for p in projs}

    def search(self, x: torch.Tensor):
        """x [T, dim] -> (scores [T, heads, knn] fp32, slots [T, heads, knn] int64)."""
        T = x.shape[0]
        half = self.k_dim // 2
        q = self.query_proj(x).view(T, self.heads, 2, half)
        k1, k2 = self.keys1, self.keys2
        if self.qk_norm:
            q = self.query_norm(q)
            k1, k2 = _unit_rows(k1, self.eps), _unit_rows(k2, self.eps)
        if torch.is_autocast_enabled(q.device.type):
            # The norm's fp32 gain made q fp32; autocast would run the score matmuls in its low precision anyway,
            # and low-precision queries let `auto` pick the tensor-core search kernel.
            q = q.to(torch.get_autocast_dtype(q.device.type))
        return ops.product_key_search(q.reshape(T, self.heads, self.k_dim), k1, k2, self.knn, backend=self.backend)

    def forward(self, x: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., dim] -> [..., dim]. `values` is the shared table; None uses this layer's own."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if values is None:
            if self.values is None:
                raise ValueError("MemoryLayer: shared values expected but none passed to forward")
            values = table_for_forward(self.values.weight, x.shape[0] * self.heads * self.knn, self.cast_values)
        if torch.is_autocast_enabled(x.device.type):
            # Every consumer of x (projections) casts it to the autocast dtype anyway; cast once, so that the
            # lookup's output and its gradient stay in that dtype too instead of being promoted to fp32.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        scores, slots = self.search(x)
        if self.usage is not None and self.training:
            self.usage.add(slots)
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        if self.value_plan is not None:
            y = self.value_plan.lookup(slots.flatten(1), weights.flatten(1), values, self.backend)
        elif self.accumulate_value_grad and torch.is_grad_enabled():
            y = _lookup_into_grad(slots.flatten(1), weights.flatten(1), values, self.backend, self.merge_value_grads)
        else:
            y = ops.memory_lookup(slots.flatten(1), weights.flatten(1), values, backend=self.backend)
        y = y.to(x.dtype)  # e.g. a bf16 table in an fp32 model
        if self.swilu_proj is not None:
            y = y * F.silu(self.swilu_proj(x))
        out = self.value_proj(y)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out.reshape(shape)
