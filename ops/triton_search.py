"""Triton fused product-key search: scores [T, H, knn] fp32 (desc) and slots [T, H, knn] int64.

One program per (block of tokens, head) does everything in registers:
  1. s1 = q1 . K1^T chunk by chunk (BLOCK_N sub-keys at a time, tensor-core dots; fp32 inputs use exact
     fp32 dots, bf16/fp16 inputs bf16/fp16 dots with fp32 accumulation), keeping a running top-knn of each
     half;
  2. the candidate sums s1[a] + s2[b] for the rank pairs (a, b) with (a+1)(b+1) <= knn (the only pairs that
     can reach the top-knn; see ops/reference.py), then their top-knn.
Top-k is Triton's bitonic tl.topk on packed int64 keys: the high 32 bits are the fp32 score mapped to an
order-preserving integer, the low 32 bits are (2^31 - 1 - index). So a key carries its index, the order is
exactly "score descending, then lower index first", and no separate index bookkeeping is needed.
Tie rule (same as the reference): equal scores go to the lower sub-key index, and in the final list to the
lower slot index (slot = i1 * n_keys + i2).

The softmax over the scores is left to the caller (the ops contract returns raw scores).

Backward (scores are s1[i1] + s2[i2] of the chosen slots): one kernel scatters each token's score gradients
into a dense row over the sub-keys (W1[h, t, i] = sum of g over the chosen slots with i1 = i; duplicates summed
in registers, each element written once: no atomics), then batched GEMMs give grad_q1 = W1 K1 and
grad_K1 = W1^T q1 (same for the second half). bf16/fp16 queries: GEMMs in that dtype (W rounded once, fp32
accumulation and fp32 grad_K); fp32 queries: fp32 GEMMs.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .triton_lookup import _npow2

_MAXI = 2**31 - 1


@triton.jit
def _pack(score, idx):
    """fp32 score, int32 index -> int64 key ordered by (score desc, index asc) under signed comparison."""
    b = score.to(tl.int32, bitcast=True)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)  # negative floats: reverse magnitude order
    return (b.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _unpack(key):
    b = (key >> 32).to(tl.int32)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    idx = 0x7FFFFFFF - (key & 0xFFFFFFFF).to(tl.int32)
    return b.to(tl.float32, bitcast=True), idx


@triton.jit
def _half_topk(q, k_ptr, NK, HALF, stride_kn, BLOCK_T: tl.constexpr, HALF_P: tl.constexpr,
               BLOCK_N: tl.constexpr, KP: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """Running top-KP (packed keys, sorted desc) of q [BLOCK_T, HALF_P] against the NK sub-keys at k_ptr."""
    best = _pack(tl.full([BLOCK_T, KP], float("-inf"), tl.float32), tl.full([BLOCK_T, KP], 0x7FFFFFFF, tl.int32))
    for n0 in range(0, NK, BLOCK_N):
        s = _half_scores(q, k_ptr, n0, NK, HALF, stride_kn, BLOCK_T, HALF_P, BLOCK_N, IEEE, INTERP)
        n = n0 + tl.arange(0, BLOCK_N)
        key = _pack(s, tl.broadcast_to(n[None, :], [BLOCK_T, BLOCK_N]))
        if BLOCK_N > KP:
            key = tl.topk(key, KP)  # sorted desc
        else:
            key = tl.sort(key, descending=True)
        # best (desc) vs the chunk's list reversed (asc): the elementwise max holds the top-KP of the union and
        # is a bitonic sequence, so one bitonic merge (log2 KP layers) sorts it; no full re-sort per chunk.
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(key, 1)), descending=True)
    return best


@triton.jit
def _half_scores(q, k_ptr, n0, NK, HALF, stride_kn, BLOCK_T: tl.constexpr, HALF_P: tl.constexpr,
                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """Scores [BLOCK_T, BLOCK_N] of q against sub-keys n0 .. n0+BLOCK_N (-inf past NK)."""
    c = tl.arange(0, HALF_P)
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = n < NK
    kt = tl.load(k_ptr + n[None, :].to(tl.int64) * stride_kn + c[:, None], mask=nmask[None, :] & (c < HALF)[:, None],
                 other=0.0).to(q.dtype)  # [HALF_P, BLOCK_N]
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    elif INTERP:  # the CPU interpreter's bf16 dot is wrong; fp32 dot of the same bf16 values is exact
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    return tl.where(nmask[None, :], s, float("-inf"))


@triton.jit
def _pk_search_kernel(
    q_ptr, k1_ptr, k2_ptr, cand_a_ptr, cand_b_ptr, scores_ptr, idx_ptr,
    T, H, NK, HALF, KNN, NCAND,
    stride_qt, stride_qh, stride_kh, stride_kn,
    BLOCK_T: tl.constexpr, HALF_P: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr, CP: tl.constexpr,
    IEEE: tl.constexpr, INTERP: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tmask = t < T
    c = tl.arange(0, HALF_P)
    qmask = tmask[:, None] & (c < HALF)[None, :]
    qbase = q_ptr + t[:, None] * stride_qt + h * stride_qh + c[None, :]
    if IEEE:
        q1 = tl.load(qbase, mask=qmask, other=0.0).to(tl.float32)
        q2 = tl.load(qbase + HALF, mask=qmask, other=0.0).to(tl.float32)
    else:
        q1 = tl.load(qbase, mask=qmask, other=0.0)
        q2 = tl.load(qbase + HALF, mask=qmask, other=0.0)
    best1 = _half_topk(q1, k1_ptr + h * stride_kh, NK, HALF, stride_kn, BLOCK_T, HALF_P, BLOCK_N, KP, IEEE, INTERP)
    best2 = _half_topk(q2, k2_ptr + h * stride_kh, NK, HALF, stride_kn, BLOCK_T, HALF_P, BLOCK_N, KP, IEEE, INTERP)
    v1, i1 = _unpack(best1)
    v2, i2 = _unpack(best2)
    # candidate rank pairs (a, b) with (a+1)(b+1) <= knn, padded to CP entries
    j = tl.arange(0, CP)
    cvalid = j < NCAND
    a = tl.broadcast_to(tl.load(cand_a_ptr + j, mask=cvalid, other=0)[None, :], [BLOCK_T, CP])
    b = tl.broadcast_to(tl.load(cand_b_ptr + j, mask=cvalid, other=0)[None, :], [BLOCK_T, CP])
    cs = tl.gather(v1, a, 1) + tl.gather(v2, b, 1)
    slot = tl.gather(i1, a, 1) * NK + tl.gather(i2, b, 1)
    cs = tl.where(cvalid[None, :], cs, float("-inf"))
    top = tl.topk(_pack(cs, slot), KP)
    score, slot = _unpack(top)
    k = tl.arange(0, KP)
    omask = tmask[:, None] & (k < KNN)[None, :]
    off = (t[:, None] * H + h) * KNN + k[None, :]
    tl.store(scores_ptr + off, score, mask=omask)
    tl.store(idx_ptr + off, slot.to(tl.int64), mask=omask)


def _candidates(knn: int, device):
    """Rank pairs (a, b) with (a+1)(b+1) <= knn, a-major, as int32 device tensors. Built with device ops
    (repeat_interleave with a known output size): no host-to-device copy, no sync, no cache to keep."""
    r = torch.arange(knn, device=device, dtype=torch.int64)
    count = knn // (r + 1)
    total = sum(knn // (i + 1) for i in range(knn))
    a = torch.repeat_interleave(r, count, output_size=total)
    first = torch.cumsum(count, 0) - count
    b = torch.arange(total, device=device, dtype=torch.int64) - first[a]
    return a.to(torch.int32), b.to(torch.int32)


def search_config(T: int, half: int, ieee: bool, knn_p: int):
    """(BLOCK_T, BLOCK_N, num_warps, num_stages): the best of the launch-config sweeps recorded in BENCHMARKS.md.

    bf16/fp16 take many tokens per program: the top-k work per token is fixed, while the sub-key reads and the dot
    set-up are shared by more tokens as BLOCK_T grows. Exact fp32 dots (no tensor cores) ran fastest with few
    tokens per program. One pipeline stage: the key chunk, the dot operands and the top-k layout conversions
    already fill most of the shared memory."""
    if ieee:
        return 16, max(knn_p, 64), 4, 1
    return 128, max(knn_p, 64), 8, 1


def empty_results(query, knn: int):
    """Uninitialised (scores [T, H, knn] fp32, indices [T, H, knn] int64) on the query's device."""
    T, H = query.shape[0], query.shape[1]
    return (query.new_empty((T, H, knn), dtype=torch.float32), query.new_empty((T, H, knn), dtype=torch.int64))


def search_forward(query, keys1, keys2, knn: int, config=None):
    T, H, k_dim = query.shape
    NK, half = keys1.shape[1], keys1.shape[2]
    scores, indices = empty_results(query, knn)
    if T == 0:
        return scores, indices
    ieee = query.dtype == torch.float32
    kp = max(_npow2(knn), 8)  # Triton 3.6 fails to compile the top-k at 4 columns
    ca, cb = _candidates(knn, query.device)
    cp = max(_npow2(ca.numel()), kp)
    block_t, block_n, warps, stages = config or search_config(T, half, ieee, kp)
    if not ieee:  # cast the (small) sub-key tables once, not in every program
        keys1, keys2 = keys1.to(query.dtype), keys2.to(query.dtype)
    block_n = max(block_n, kp)
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    grid = (triton.cdiv(T, block_t), H)
    _pk_search_kernel[grid](query, keys1, keys2, ca, cb, scores, indices,
                            T, H, NK, half, knn, ca.numel(), query.stride(0), query.stride(1), keys1.stride(0),
                            keys1.stride(1), BLOCK_T=block_t, HALF_P=max(_npow2(half), 16), BLOCK_N=block_n, KP=kp,
                            CP=cp, IEEE=ieee, INTERP=interp, num_warps=warps, num_stages=stages)
    return scores, indices


@triton.jit
def _dense_grad_rows_kernel(idx_ptr, g_ptr, w1_ptr, w2_ptr, T, H, NK, KNN, t0, TC,
                            BLOCK_T: tl.constexpr, KP: tl.constexpr):
    """Scatter the score gradients of one chunk of tokens into dense per-token rows over the sub-keys:
    W1[h, t - t0, i] = sum_k g[t, h, k] [i1[t, h, k] == i] (and W2 with i2). The rows must be zero on entry.
    Duplicates inside a row (one sub-key in several chosen slots) are summed in registers and stored once by
    their first occurrence, so every element is written by one thread at most: no atomics, deterministic."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    tl_ = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t = (t0 + tl_).to(tl.int64)
    tmask = (tl_ < TC) & (t < T)
    k = tl.arange(0, KP)
    kmask = k < KNN
    m = tmask[:, None] & kmask[None, :]
    off = (t[:, None] * H + h) * KNN + k[None, :]
    idx = tl.load(idx_ptr + off, mask=m, other=0)
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
    before = (k[None, :] < k[:, None])[None, :, :]  # [1, k, k']: k' < k
    valid = kmask[None, None, :]
    row = (h * TC + tl_).to(tl.int64) * NK
    for half in tl.static_range(2):
        if half == 0:
            i = idx // NK
        else:
            i = idx % NK
        eq = (i[:, :, None] == i[:, None, :]) & valid  # [BT, k, k']
        tot = tl.sum(tl.where(eq, g[:, None, :], 0.0), axis=2)
        first = tl.sum((eq & before).to(tl.int32), axis=2) == 0
        if half == 0:
            tl.store(w1_ptr + row[:, None] + i, tot.to(w1_ptr.dtype.element_ty), mask=m & first)
        else:
            tl.store(w2_ptr + row[:, None] + i, tot.to(w2_ptr.dtype.element_ty), mask=m & first)


# Bytes of the two dense [H, tokens, n_keys] gradient-row buffers per token chunk of the backward.
_BWD_BUDGET = 1 << 29


@functools.cache
def _bmm_has_out_dtype(device_type: str) -> bool:
    """Whether torch.bmm(..., out_dtype=float32) runs on bf16 inputs here (newer torch, CUDA)."""
    try:
        a = torch.zeros((1, 1, 1), dtype=torch.bfloat16, device=device_type)
        torch.bmm(a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _bmm_f32(a, b):
    """Batched a @ b with an fp32 result; bf16/fp16 inputs keep tensor-core speed (fp32 accumulation and
    output) where torch.bmm's out_dtype runs (CUDA), else the product of the fp32 upcasts."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda and _bmm_has_out_dtype(a.device.type):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def dense_grad_rows(indices, grad_scores, t0: int, n: int, n_keys: int, dtype):
    """(W1, W2) [H, n, n_keys] in `dtype`: tokens t0 .. t0+n-1's score gradients scattered onto their chosen sub-keys
    of each half (a sub-key chosen by several slots gets their sum), zeros elsewhere (_dense_grad_rows_kernel)."""
    H, knn = indices.shape[1], indices.shape[2]
    w1 = torch.zeros((H, n, n_keys), dtype=dtype, device=indices.device)
    w2 = torch.zeros((H, n, n_keys), dtype=dtype, device=indices.device)
    block_t = 16
    _dense_grad_rows_kernel[(triton.cdiv(n, block_t), H)](
        indices, grad_scores, w1, w2, indices.shape[0], H, n_keys, knn, t0, n, BLOCK_T=block_t,
        KP=max(_npow2(knn), 2), num_warps=4)
    return w1, w2


def search_backward(grad_scores, indices, query, keys1, keys2, dense_rows=None):
    """Gradients of scores[t,h,k] = q1[t,h] . K1[h, i1] + q2[t,h] . K2[h, i2] (i1, i2 of the chosen slot).

    Per chunk of tokens, one kernel scatters the score gradients into dense rows W1 [H, Tc, n_keys] (and W2),
    then four batched GEMMs give grad_q1 = W1 K1, grad_K1 += W1^T q1 (same for the second half). The GEMMs
    run in the query's dtype for bf16/fp16 queries (W rounded to it once, fp32 accumulation, grad_K in fp32),
    in fp32 for fp32 queries. No sort, no atomics: deterministic. dense_rows: another function with
    dense_grad_rows's contract (default: that one)."""
    T, H, k_dim = query.shape
    NK, half = keys1.shape[1], keys1.shape[2]
    cd = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.float32
    gq = torch.empty((T, H, k_dim), dtype=query.dtype, device=query.device)
    if T == 0:
        return gq, torch.zeros_like(keys1), torch.zeros_like(keys2)
    k1c, k2c = keys1.to(cd), keys2.to(cd)
    qc = query.to(cd)
    elem = torch.finfo(cd).bits // 8
    tc = max(1, min(T, _BWD_BUDGET // (2 * H * NK * elem)))
    g = grad_scores.contiguous()
    gk1 = gk2 = None  # fp32; the first chunk's products are the sums (no zero fill, no add, for one chunk)
    for t0 in range(0, T, tc):
        n = min(tc, T - t0)
        w1, w2 = (dense_rows or dense_grad_rows)(indices, g, t0, n, NK, cd)
        q1 = qc[t0:t0 + n, :, :half].transpose(0, 1)  # [H, n, half]
        q2 = qc[t0:t0 + n, :, half:].transpose(0, 1)
        # Straight into gq's two halves: each head's [n, half] block is a matrix with row stride H * k_dim, which
        # the GEMM writes in place (an assignment would write a temporary and copy it, strided, per half).
        torch.bmm(w1, k1c, out=gq[t0:t0 + n, :, :half].transpose(0, 1))
        torch.bmm(w2, k2c, out=gq[t0:t0 + n, :, half:].transpose(0, 1))
        p1, p2 = _bmm_f32(w1.transpose(1, 2), q1), _bmm_f32(w2.transpose(1, 2), q2)
        gk1 = p1 if gk1 is None else gk1.add_(p1)
        gk2 = p2 if gk2 is None else gk2.add_(p2)
    return gq, gk1.to(keys1.dtype), gk2.to(keys2.dtype)


@torch.library.custom_op("mnemo::triton_pk_search", mutates_args=())
def _search_op(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    return search_forward(query, keys1, keys2, knn)


def search_forward_fake(query, keys1, keys2, knn):
    """Outputs' shapes and dtypes for torch.compile: the fake of this search op and of ops/cuda_search.py's."""
    return empty_results(query, knn)


_search_op.register_fake(search_forward_fake)


@torch.library.custom_op("mnemo::triton_pk_search_backward", mutates_args=())
def _search_bwd_op(grad_scores: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, keys1: torch.Tensor,
                   keys2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return search_backward(grad_scores, indices, query, keys1, keys2)


def search_backward_fake(grad_scores, indices, query, keys1, keys2):
    """What a search backward op returns, for torch.compile's tracing: (grad_query, grad_keys1, grad_keys2)."""
    return torch.empty_like(query), torch.empty_like(keys1), torch.empty_like(keys2)


_search_bwd_op.register_fake(search_backward_fake)


def _setup(ctx, inputs, output):
    query, keys1, keys2, knn = inputs
    ctx.save_for_backward(query, keys1, keys2, output[1])


def register_search_autograd(op, backward_op=None) -> None:
    """Give a search op (query, keys1, keys2, knn) -> (scores, indices) a backward: this module's (or
    `backward_op`, with _search_bwd_op's signature). It depends only on the chosen indices, not on how they were
    found (ops/cuda_search.py shares it)."""
    bwd = backward_op or _search_bwd_op

    def backward(ctx, grad_scores, grad_indices):
        query, keys1, keys2, indices = ctx.saved_tensors
        gq, gk1, gk2 = bwd(grad_scores.contiguous(), indices, query, keys1, keys2)
        need = ctx.needs_input_grad
        return (gq if need[0] else None), (gk1 if need[1] else None), (gk2 if need[2] else None), None

    op.register_autograd(backward, setup_context=_setup)


register_search_autograd(_search_op)


def check_search_args(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, knn: int) -> None:
    """The shape, dtype and knn checks every search implementation makes before its kernel."""
    if query.dim() != 3 or query.shape[2] % 2:
        raise ValueError(f"product_key_search: query must be [T, H, k_dim] with k_dim even, got {tuple(query.shape)}")
    _, H, k_dim = query.shape
    half = k_dim // 2
    if keys1.dim() != 3 or keys1.shape[0] != H or keys1.shape[2] != half or keys2.shape != keys1.shape:
        raise ValueError(f"product_key_search: query {tuple(query.shape)} needs keys [H={H}, n_keys, {half}], got "
                         f"keys1 {tuple(keys1.shape)}, keys2 {tuple(keys2.shape)}")
    n_keys = keys1.shape[1]
    if not 1 <= knn <= n_keys:
        raise ValueError(f"product_key_search: knn must be in [1, n_keys={n_keys}], got {knn}")
    if n_keys * n_keys > _MAXI:
        raise ValueError(f"product_key_search: n_keys**2 must be < 2**31 (slots are packed in 31 bits), got {n_keys}")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"product_key_search: query must be float32/bfloat16/float16, got {query.dtype}")


def product_key_search(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, knn: int):
    """query [T, H, k_dim], keys1/keys2 [H, n_keys, k_dim//2] -> (scores [T, H, knn] fp32 sorted desc,
    indices [T, H, knn] int64, slot = i1 * n_keys + i2). Exact top-knn; ties to the lower slot index.
    fp32 inputs are scored with exact fp32 dots; bf16/fp16 queries with dots in the query's dtype (keys cast
    to it) and fp32 accumulation."""
    check_search_args(query, keys1, keys2, knn)
    return _search_op(query.contiguous(), keys1.contiguous(), keys2.contiguous(), int(knn))
