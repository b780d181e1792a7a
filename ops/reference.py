"""Plain-PyTorch product-key search and memory lookup (any device; the ground truth for the kernels).

Product-key search. Per head, the query is split in two halves q1, q2 scored against sub-key tables K1, K2
(n_keys rows of k_dim/2 each). Slot i1 * n_keys + i2 has key [K1[i1]; K2[i2]] and score s1[i1] + s2[i2].
Order of slots: by score descending, ties broken by the LOWER SLOT INDEX first. The search is exact under
that order:
  * the top-knn slots only use rows in the top-knn of s1 and of s2 (each ranked by score desc, then row index
    asc), since a row outside them has knn better rows, each giving a slot that comes earlier;
  * with both lists ranked, pair of ranks (a, b) has (a+1)(b+1) - 1 pairs ranked before it, so only pairs with
    (a+1)(b+1) <= knn can be in the top-knn (knn 32: 119 candidates instead of 1024).
Floating-point addition is monotone, so these arguments also hold for the rounded sums.

Memory lookup. out[t] = sum_s weights[t, s] * values[indices[t, s]], accumulated in fp32 (fp64 for fp64
values), returned in values.dtype. Tokens are processed in chunks so the [T, S, D] gather is never
materialised whole. The value gradient is accumulated (fp32) over the touched rows only, then scattered
into a dense zero gradient, as autograd wants one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Elements of the [chunk, S, D] gather per step: 2**24 fp32 elements = 64 MiB.
_GATHER_BUDGET = 1 << 24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation, but keep fp64 for fp64 inputs (gradcheck).
    return torch.promote_types(dtype, torch.float32)


def _ranked(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim by value desc, ties by lower position first (a stable sort, not topk,
    whose tie order is unspecified)."""
    values, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def candidate_pairs(knn: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b) with (a+1)(b+1) <= knn, the only ones that can reach the top-knn."""
    a, b = [], []
    for i in range(knn):
        for j in range(knn // (i + 1)):
            a.append(i)
            b.append(j)
    return (torch.tensor(a, dtype=torch.long, device=device), torch.tensor(b, dtype=torch.long, device=device))


def product_key_search(
    query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, knn: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """query [T, H, k_dim], keys1/keys2 [H, n_keys, k_dim//2] -> (scores [T, H, knn] fp32, indices int64).

    Scores are float32 (float64 for float64 inputs), sorted descending, differentiable w.r.t. all inputs.
    """
    T, H, k_dim = query.shape
    n_keys = keys1.shape[1]
    half = k_dim // 2
    if k_dim % 2 or keys1.shape != (H, n_keys, half) or keys2.shape != keys1.shape:
        raise ValueError(
            f"product_key_search: query {tuple(query.shape)} needs keys [H={H}, n_keys, {half}], "
            f"got keys1 {tuple(keys1.shape)}, keys2 {tuple(keys2.shape)}"
        )
    if not 1 <= knn <= n_keys:
        raise ValueError(f"product_key_search: knn must be in [1, n_keys={n_keys}], got {knn}")
    dtype = _acc_dtype(query.dtype)
    with torch.autocast(query.device.type, enabled=False):  # scores in fp32 even under bf16 autocast
        q = query.to(dtype)
        s1 = torch.einsum("thd,hnd->thn", q[..., :half], keys1.to(dtype))  # [T, H, n_keys]
        s2 = torch.einsum("thd,hnd->thn", q[..., half:], keys2.to(dtype))
        return select_top_slots(s1, s2, knn)


def select_top_slots(s1: torch.Tensor, s2: torch.Tensor, knn: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact top-knn slots of given half scores s1, s2 [..., n_keys]: (scores [..., knn] desc, slots [..., knn]
    with slot = i1 * n_keys + i2), ties to the lower sub-key index in each half and to the lower slot at the end."""
    n_keys = s1.shape[-1]
    top1, i1 = _ranked(s1, knn)  # [..., knn]
    top2, i2 = _ranked(s2, knn)
    a, b = candidate_pairs(knn, device=s1.device)
    cand = top1[..., a] + top2[..., b]  # [..., P]
    slots = i1[..., a] * n_keys + i2[..., b]
    # Final order: score desc, then slot asc. Sort by slot first; the stable score sort keeps that order in ties.
    by_slot = slots.argsort(dim=-1)
    cand = cand.gather(-1, by_slot)
    slots = slots.gather(-1, by_slot)
    scores, pos = _ranked(cand, knn)
    return scores, slots.gather(-1, pos)


def _chunk_tokens(n_slots: int, dim: int, chunk_tokens: Optional[int]) -> int:
    if chunk_tokens is not None:
        return max(1, int(chunk_tokens))
    return max(1, _GATHER_BUDGET // max(1, n_slots * dim))


class _MemoryLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weights, values, chunk):
        T, S = indices.shape
        acc = _acc_dtype(values.dtype)
        out = values.new_empty((T, values.shape[1]))
        for t0 in range(0, T, chunk):
            idx = indices[t0 : t0 + chunk]
            v = values[idx].to(acc)  # [c, S, D]
            w = weights[t0 : t0 + chunk].to(acc)
            out[t0 : t0 + chunk] = torch.einsum("ts,tsd->td", w, v).to(values.dtype)
        ctx.save_for_backward(indices, weights, values)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indices, weights, values = ctx.saved_tensors
        chunk = ctx.chunk
        grad_w = grad_v = None
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad_out, indices, weights, values, chunk)
        if ctx.needs_input_grad[2]:
            grad_v = value_grad(grad_out, indices, weights, values, chunk)
        return None, grad_w, grad_v, None


def weight_grad(grad_out, indices, weights, values, chunk: int) -> torch.Tensor:
    """The lookup's gradient w.r.t. its weights: <grad_out[t], values[indices[t, s]]>, in weights.dtype."""
    acc = _acc_dtype(values.dtype)
    grad_w = torch.empty_like(weights)
    for t0 in range(0, indices.shape[0], chunk):
        v = values[indices[t0 : t0 + chunk]].to(acc)
        g = grad_out[t0 : t0 + chunk].to(acc)
        grad_w[t0 : t0 + chunk] = torch.einsum("td,tsd->ts", g, v).to(weights.dtype)
    return grad_w


def value_grad(grad_out, indices, weights, values, chunk: int, accumulate_into: Optional[torch.Tensor] = None):
    """The lookup's value gradient: dense [N, D] in values.dtype, or added in place to `accumulate_into` (only the
    touched rows are read and written; one rounding to its dtype per row)."""
    acc = _acc_dtype(values.dtype)
    # Accumulate only over the rows that were read: cost O(tokens), not O(table) (bar the zero fill).
    rows, inverse = torch.unique(indices, return_inverse=True)
    partial = torch.zeros(rows.shape[0], values.shape[1], dtype=acc, device=values.device)
    for t0 in range(0, indices.shape[0], chunk):
        w = weights[t0 : t0 + chunk].to(acc)  # [c, S]
        g = grad_out[t0 : t0 + chunk].to(acc)  # [c, D]
        contrib = w[:, :, None] * g[:, None, :]  # [c, S, D]
        partial.index_add_(0, inverse[t0 : t0 + chunk].reshape(-1), contrib.reshape(-1, values.shape[1]))
    if accumulate_into is not None:
        accumulate_into[rows] = (accumulate_into[rows].to(acc) + partial).to(accumulate_into.dtype)
        return accumulate_into
    grad_v = torch.zeros_like(values)
    grad_v[rows] = partial.to(values.dtype)
    return grad_v


def lookup_backward(grad_out, indices, weights, values, compute_gw: bool = True, accumulate_into=None,
                    chunk_tokens: Optional[int] = None, sum_squares_out=None, nonzero_rows_out=None):
    """The lookup's backward without autograd: (grad_weights [T, S] or None, grad_values), the value gradient dense
    or added to `accumulate_into` (see value_grad). For a dense gradient written whole, as the Triton kernel's
    contract says: sum_squares_out, a 0-dim fp32 tensor, is set to its squared norm (here a separate reduction);
    nonzero_rows_out, an [N] bool tensor, to which rows some pair touched."""
    for name, out in (("sum_squares_out", sum_squares_out), ("nonzero_rows_out", nonzero_rows_out)):
        if out is not None and accumulate_into is not None:
            raise ValueError(f"lookup_backward: {name} needs the dense gradient written whole (no accumulate_into)")
    chunk = _chunk_tokens(indices.shape[1], values.shape[1], chunk_tokens)
    indices = indices.long()
    grad_w = weight_grad(grad_out, indices, weights, values, chunk) if compute_gw else None
    grad_v = value_grad(grad_out, indices, weights, values, chunk, accumulate_into)
    if sum_squares_out is not None:
        sum_squares_out.copy_(grad_v.to(torch.promote_types(grad_v.dtype, torch.float32)).square().sum())
    if nonzero_rows_out is not None:
        nonzero_rows_out.zero_().index_fill_(0, indices.reshape(-1), grad_v.shape[1] > 0)
    return grad_w, grad_v


def lookup_weight_grad(grad_out, indices, weights, values, chunk_tokens: Optional[int] = None):
    """The lookup's weight gradient alone, grad_w [T, S] = <grad_out[t], values[indices[t, s]]> in weights.dtype."""
    return weight_grad(grad_out, indices.long(), weights, values, _chunk_tokens(indices.shape[1], values.shape[1],
                                                                                 chunk_tokens))


def memory_lookup(
    indices: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, chunk_tokens: Optional[int] = None
) -> torch.Tensor:
    """indices [T, S] int, weights [T, S] float, values [N, D] -> out [T, D] in values.dtype.

    `chunk_tokens` bounds the tokens gathered at once (default: about 2**24 gathered elements per chunk).
    """
    if indices.dim() != 2 or weights.shape != indices.shape or values.dim() != 2:
        raise ValueError(
            f"memory_lookup: need indices [T, S], weights [T, S], values [N, D]; got {tuple(indices.shape)}, "
            f"{tuple(weights.shape)}, {tuple(values.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"memory_lookup: indices must be int32 or int64, got {indices.dtype}")
    chunk = _chunk_tokens(indices.shape[1], values.shape[1], chunk_tokens)
    return _MemoryLookup.apply(indices.long(), weights, values, chunk)
