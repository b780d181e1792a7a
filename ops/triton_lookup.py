"""Triton memory lookup: out[t] = sum_s weights[t, s] * values[indices[t, s]], and its backward.

Forward: one program per (token, column chunk) reads a [BLOCK_S, BLOCK_D] tile of value rows per step (BLOCK_S
of the token's slots at once, so many row reads are in flight), accumulates w * v in fp32 into a 2-D
accumulator and reduces it over the slot axis once at the end. Any value dim works: columns are masked, and
loads stay 16 bytes wide whenever D is a multiple of 16 elements (Triton specialises such sizes).

Backward (one kernel, deterministic, no float atomics):
  1. sort the flattened (token, slot) pairs by row, stably (on CUDA a CUB radix sort over the row bits only,
     ops/cuda_sort.py; torch.sort elsewhere): equal rows become one segment whose pairs are in pair-index order;
  2. one program per segment (= per touched row) loads the row's value V[r] once, gathers the output
     gradient of each of its pairs, writes grad_w[pair] = <grad_out[t], V[r]> and accumulates
     grad_V[r] = sum w[pair] * grad_out[t] in fp32, in a fixed order.
  Cost O(tokens * slots) plus one read of each touched row: the value table is read once per touched row
  (not once per pair as a token-ordered grad_w would), and nothing table-sized is sorted.
  A program is bound by its chain of dependent loads more than by bytes, so each segment's row and its first
  pair to walk are gathered by segment before the launch: the value row and the first output-gradient row then
  wait for one load of the program's own index, not for a segment bound and a sorted entry after it (programs
  that own a row of the table, the merged pass's, know their row and walk as before).
  Untouched rows of the dense gradient are zeroed by the same launch: programs past the last segment each
  take one untouched row (listed in order by a cumsum over a touched-row mask), so every row is written once.
  Hot rows: a training step reads some rows thousands of times, and the program walking such a row would hold
  the launch long after the rest. Without grad_w (the merged pass), each full run of `run_pairs` sorted pairs
  of a row is summed first by a program of its own into an fp32 partial row (`_run_partial_kernel`), and the
  row's program adds its partials in order before its remaining pairs: still one fixed summation order.
  The dense form can also sum the squares of the gradient it writes (partial sums per program, added in order
  after the launch), so a gradient-norm clip need not read the table-sized gradient again.

Weights' gradient alone (`lookup_weight_grad`): grad_w in token order, forward-like gathers with a dot per slot, for
a backward that adds the value gradient later in one pass over several layers (ops/lookup_into_grad.py, merge).

Value-gradient form. Autograd returns a dense gradient shaped like the table (zeros + touched rows), which
plain (dense) AdamW applies unchanged. `memory_lookup_backward(..., sparse=True)` also exposes the compact form
(unique rows + their gradients) for a sparse optimizer step; it is not what autograd returns because a
torch sparse gradient breaks dense optimizers and torch.compile.
"""
import torch
import triton
import triton.language as tl

from . import cuda_sort


def _npow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _lookup_fwd_kernel(
    idx_ptr, w_ptr, v_ptr, out_ptr,
    S, D, stride_v, stride_out, n_dblocks,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # d-chunks of one token are adjacent programs: they share the token's indices (L1/L2) and read
    # neighbouring bytes of the same rows.
    pid = tl.program_id(0)
    t = (pid // n_dblocks).to(tl.int64)
    d = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < S
        rows = tl.load(idx_ptr + t * S + s, mask=smask, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * S + s, mask=smask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * stride_v + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
        acc += w[:, None] * v.to(tl.float32)
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + t * stride_out + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _weight_grad_kernel(
    idx_ptr, g_ptr, v_ptr, gw_ptr,
    S, D, stride_g, stride_v, SPAN,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    # grad_w[t, s] = <grad_out[t], V[idx[t, s]]> in token order, like the forward: one program per (token, span of
    # SPAN slots) reads BLOCK_S value rows per step in long contiguous pieces, as the forward does, and finishes
    # their dots itself. A row that fits one column chunk is read whole, with the token's output-gradient row
    # held in registers throughout (the loop over chunks, even run once, measured slower).
    t = tl.program_id(0).to(tl.int64)
    s_lo = tl.program_id(1) * SPAN
    d = tl.arange(0, BLOCK_D)
    if ONE_CHUNK:
        dmask = d < D
        g = tl.load(g_ptr + t * stride_g + d, mask=dmask, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_lo + SPAN, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < S
            rows = tl.load(idx_ptr + t * S + s, mask=smask, other=0).to(tl.int64)
            v = tl.load(v_ptr + rows[:, None] * stride_v + d[None, :], mask=smask[:, None] & dmask[None, :],
                        other=0.0)
            tl.store(gw_ptr + t * S + s, tl.sum(v.to(tl.float32) * g[None, :], axis=1), mask=smask)
    else:
        for s0 in range(s_lo, s_lo + SPAN, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < S
            rows = tl.load(idx_ptr + t * S + s, mask=smask, other=0).to(tl.int64)
            acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + d
                dmask = dd < D
                g = tl.load(g_ptr + t * stride_g + dd, mask=dmask, other=0.0).to(tl.float32)
                v = tl.load(v_ptr + rows[:, None] * stride_v + dd[None, :], mask=smask[:, None] & dmask[None, :],
                            other=0.0)
                acc += v.to(tl.float32) * g[None, :]
            tl.store(gw_ptr + t * S + s, tl.sum(acc, axis=1), mask=smask)


@triton.jit
def _walk_pairs(acc, vrow, i_begin, end, perm_ptr, w_ptr, g_ptr, gw_ptr, P, S, stride_g, d, dmask, pid_d,
                BLOCK_P: tl.constexpr, COMPUTE_GW: tl.constexpr):
    """acc + sum of w[pair] * grad_out[token] over the sorted pairs [i_begin, end) of one row, in order; with
    COMPUTE_GW also each pair's grad_w = <grad_out[token], V[row]> over this program's columns (column chunk pid_d
    writes its own partial dot)."""
    for i0 in range(i_begin, end, BLOCK_P):
        i = i0 + tl.arange(0, BLOCK_P)
        pmask = i < end
        p = tl.load(perm_ptr + i, mask=pmask, other=0).to(tl.int64)
        acc = _add_pairs(acc, vrow, p, pmask, w_ptr, g_ptr, gw_ptr, P, S, stride_g, d, dmask, pid_d, COMPUTE_GW)
    return acc


@triton.jit
def _add_pairs(acc, vrow, p, pmask, w_ptr, g_ptr, gw_ptr, P, S, stride_g, d, dmask, pid_d, COMPUTE_GW: tl.constexpr):
    """acc + sum of w[p] * grad_out[p // S] over a tile of pairs p (int64, those under pmask), and with COMPUTE_GW their
    grad_w over this program's columns."""
    t = p // S
    w = tl.load(w_ptr + p, mask=pmask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + t[:, None] * stride_g + d[None, :], mask=pmask[:, None] & dmask[None, :], other=0.0)
    g = g.to(tl.float32)
    acc += tl.sum(w[:, None] * g, axis=0)
    if COMPUTE_GW:
        gw = tl.sum(g * vrow[None, :], axis=1)
        tl.store(gw_ptr + pid_d * P + p, gw, mask=pmask)
    return acc


@triton.jit
def _run_partial_kernel(
    sorted_rows_ptr, perm_ptr, seg_start_ptr, run_seg_ptr, nfull_ptr, cum_ptr,
    w_ptr, g_ptr, v_ptr, gw_ptr, part_ptr,
    M, P, S, D, stride_g, stride_v,
    RUN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_GW: tl.constexpr,
):
    # Program j sums the j-th run of RUN sorted pairs (the full runs of all segments, numbered in order) into an
    # fp32 partial row; the segment's own program adds its partials in order (_segment_bwd_kernel).
    j = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    seg = tl.load(run_seg_ptr + j)
    if seg < M:  # past the last run: seg == M
        first = tl.load(cum_ptr + seg) - tl.load(nfull_ptr + seg)
        start = tl.load(seg_start_ptr + seg) + (j - first) * RUN
        vrow = tl.zeros([BLOCK_D], dtype=tl.float32)
        if COMPUTE_GW:
            r = tl.load(sorted_rows_ptr + start).to(tl.int64)
            vrow = tl.load(v_ptr + r * stride_v + d, mask=dmask, other=0.0).to(tl.float32)
        acc = _walk_pairs(tl.zeros([BLOCK_D], dtype=tl.float32), vrow, start, start + RUN, perm_ptr, w_ptr, g_ptr,
                          gw_ptr, P, S, stride_g, d, dmask, pid_d, BLOCK_P, COMPUTE_GW)
        tl.store(part_ptr + j.to(tl.int64) * D + d, acc, mask=dmask)


@triton.jit
def _store_square_parts(sq_ptr, seg, pid_d, parts, SQ_PARTS: tl.constexpr):
    """Program (seg, pid_d)'s SQ_PARTS partial sums of squares, in grid order among every program's."""
    j = tl.arange(0, SQ_PARTS)
    tl.store(sq_ptr + (seg.to(tl.int64) * tl.num_programs(1) + pid_d) * SQ_PARTS + j, parts)


@triton.jit
def _segment_bwd_kernel(
    perm_ptr, seg_start_ptr, nseg_ptr, nfull_ptr, cum_ptr, part_ptr, seg_rows_ptr, seg_first_ptr,
    w_ptr, g_ptr, v_ptr, gw_ptr, gv_ptr, rows_out_ptr, untouched_ptr, sq_ptr,
    P, S, D, stride_g, stride_v, stride_gv,
    RUN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RUNS: tl.constexpr,
    COMPUTE_GW: tl.constexpr, SPARSE: tl.constexpr, ZERO_UNTOUCHED: tl.constexpr, ACCUMULATE: tl.constexpr,
    ADJACENT_CHUNKS: tl.constexpr = 0, ROW_PROGRAMS: tl.constexpr = False, SUM_SQUARES: tl.constexpr = False,
    SQ_PARTS: tl.constexpr = 1, FIRST_PAIR: tl.constexpr = False,
):
    if ADJACENT_CHUNKS > 0:  # a 1-D grid: the column chunks of a segment are ADJACENT_CHUNKS neighbouring programs
        seg = tl.program_id(0) // ADJACENT_CHUNKS
        pid_d = tl.program_id(0) % ADJACENT_CHUNKS
    else:
        seg = tl.program_id(0)
        pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    if ROW_PROGRAMS:  # program seg owns row seg: its pairs are seg_start[seg] .. seg_start[seg + 1], maybe none
        start = tl.load(seg_start_ptr + seg)
        end = tl.load(seg_start_ptr + seg + 1)
        live = start < end
    else:  # program seg owns the seg-th touched row, if there is one
        nseg = tl.load(nseg_ptr)
        live = seg < nseg
    if live:
        if ROW_PROGRAMS:
            r = seg.to(tl.int64)
        else:
            start = tl.load(seg_start_ptr + seg)
            end = tl.load(seg_start_ptr + seg + 1)
            # the segment's row as prepared by segment (seg_rows), not sorted_rows[start]: its value row's load then
            # waits for one load instead of two (BENCHMARKS.md, "the segments' rows and first pairs prepared")
            r = tl.load(seg_rows_ptr + seg).to(tl.int64)
        # The value row, the old gradient row and the rows written are touched once each and stream gigabytes
        # through L2: marked evict-first, they leave more of it to the rest (BENCHMARKS.md, evict-first hints).
        vrow = tl.zeros([BLOCK_D], dtype=tl.float32)
        if COMPUTE_GW:
            vrow = tl.load(v_ptr + r * stride_v + d, mask=dmask, other=0.0,
                           eviction_policy="evict_first").to(tl.float32)
        # 1-D accumulator: the pair axis lives in each thread's registers (threads span the columns), so the
        # per-step sum over it is in-thread and the tile costs no extra registers between steps.
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        i_begin = start
        if HAS_RUNS:
            # A hot row's full runs were summed by other programs (_run_partial_kernel): add them in order, then
            # walk only the remaining < RUN pairs, so no program walks more than RUN pairs.
            n_full = tl.load(nfull_ptr + seg)
            part_row = part_ptr + (tl.load(cum_ptr + seg) - n_full).to(tl.int64) * D
            for _ in range(0, n_full):
                acc += tl.load(part_row + d, mask=dmask, other=0.0)
                part_row += D
            i_begin = start + n_full * RUN
        if FIRST_PAIR:
            # The first pair left to walk, its index prepared by segment (seg_first): its weight and output-gradient
            # row wait for the segment's bounds only, not for a pair index read after them. A segment whose pairs
            # were all summed in runs has none (masked loads add +0).
            one = tl.arange(0, 1)
            p0 = tl.load(seg_first_ptr + seg + one).to(tl.int64)
            acc = _add_pairs(acc, vrow, p0, i_begin + one < end, w_ptr, g_ptr, gw_ptr, P, S, stride_g, d, dmask, pid_d,
                             COMPUTE_GW)
            i_begin += 1
        acc = _walk_pairs(acc, vrow, i_begin, end, perm_ptr, w_ptr, g_ptr, gw_ptr, P, S, stride_g, d, dmask, pid_d,
                          BLOCK_P, COMPUTE_GW)
        row_grad = acc
        if SPARSE:  # 64-bit offsets: a compact gradient can hold more than 2^31 elements
            tl.store(gv_ptr + seg.to(tl.int64) * stride_gv + d, row_grad.to(gv_ptr.dtype.element_ty), mask=dmask,
                     eviction_policy="evict_first")
            if pid_d == 0:
                tl.store(rows_out_ptr + seg, r)
        else:
            if ACCUMULATE:  # add to the gradient already there (one rounding to its dtype)
                row_grad += tl.load(gv_ptr + r * stride_gv + d, mask=dmask, other=0.0,
                                    eviction_policy="evict_first").to(tl.float32)
            written = row_grad.to(gv_ptr.dtype.element_ty)
            tl.store(gv_ptr + r * stride_gv + d, written, mask=dmask, eviction_policy="evict_first")
            if SUM_SQUARES:  # this program's parts of the written gradient's squared norm (masked columns are 0)
                written = written.to(tl.float32)
                # SQ_PARTS partial sums of 256 columns: one sum over the whole row measured slower in this launch
                # of a million short programs (BENCHMARKS.md, "the value gradient's norm")
                part = tl.sum(tl.reshape(written * written, [SQ_PARTS, BLOCK_D // SQ_PARTS]), axis=1)
                _store_square_parts(sq_ptr, seg, pid_d, part, SQ_PARTS)
    else:
        # Padding entries of the compact form: row -1, gradient rows left unwritten (only the touched rows' bytes
        # move; up to min(T*S, N) - nseg rows of zeros would otherwise be written for nobody).
        if SPARSE and pid_d == 0:
            tl.store(rows_out_ptr + seg, -1)
        if ZERO_UNTOUCHED:  # dense form: the row that no pair touched gets its zeros
            if ROW_PROGRAMS:
                r = seg.to(tl.int64)
            else:  # program nseg + j: the j-th untouched row
                r = tl.load(untouched_ptr + (seg - nseg)).to(tl.int64)
            tl.store(gv_ptr + r * stride_gv + d, tl.zeros([BLOCK_D], gv_ptr.dtype.element_ty), mask=dmask,
                     eviction_policy="evict_first")
            if SUM_SQUARES:
                _store_square_parts(sq_ptr, seg, pid_d, tl.zeros([SQ_PARTS], tl.float32), SQ_PARTS)


# ------------------------------------------------------------------------------------------------ launchers
def _col_block(D: int, cap: int) -> int:
    """Largest power of two <= cap that divides D (no half-empty last chunk, e.g. 1536 -> 512), or the
    next power of two above a small D (masked)."""
    b = min(_npow2(D), cap)
    while b > 128 and D % b:
        b //= 2
    return b


def fwd_config(S: int, D: int, elem_bytes: int):
    """(BLOCK_S, BLOCK_D, num_warps): up to 2 KiB contiguous per row chunk and ~4K elements per tile, but only 2 rows
    per step once chunks are 1 KiB or wider: a smaller tile keeps more programs resident, which hides the gathers'
    latency better than more rows in flight per program (the launch-config sweeps in BENCHMARKS.md)."""
    block_d = _col_block(D, max(16, 2048 // elem_bytes))
    block_s = max(1, min(_npow2(S), 4096 // block_d))
    if block_d * elem_bytes >= 1024:
        block_s = min(block_s, 2)
    warps = max(2, min(4, block_d * elem_bytes // 256))
    return block_s, block_d, warps


def lookup_forward(indices, weights, values, out=None, config=None):
    """Kernel launch for out[t] = sum_s w[t,s] V[idx[t,s]] (out may be a strided column view)."""
    T, S = indices.shape
    D = values.shape[1]
    if out is None:
        out = torch.empty((T, D), dtype=values.dtype, device=values.device)
    if T == 0 or D == 0:
        return out
    if S == 0:
        out.zero_()
        return out
    block_s, block_d, warps = config or fwd_config(S, D, values.element_size())
    n_d = triton.cdiv(D, block_d)
    _lookup_fwd_kernel[(T * n_d,)](
        indices, weights, values, out, S, D, values.stride(0), out.stride(0), n_d,
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def weight_grad_config(S: int, D: int, elem_bytes: int):
    """(BLOCK_S, BLOCK_D, num_warps, SPAN), 32 slots per program: rows of up to 2 KiB are read whole, 2 per step
    with 2 warps; wider rows in 1024-column chunks, 4 rows per step with 4 warps (the launch sweeps on a training
    step's rows and on uniform ones: BENCHMARKS.md, "the weights' gradient read like the forward")."""
    span = max(4, min(32, _npow2(S)))
    if _npow2(D) * elem_bytes <= 2048:
        return 2, _npow2(D), 2, span
    return 4, _col_block(D, 1024), 4, span


def lookup_weight_grad(grad_out, indices, weights, values, config=None):
    """The weights' gradient alone, grad_w fp32 [T, S] = <grad_out[t], values[indices[t, s]]>, in token order (for
    a backward whose value gradient is added later: ops/lookup_into_grad.py). `weights` is not read (the signature is
    ops.reference's)."""
    T, S = indices.shape
    D = values.shape[1]
    gw = torch.empty((T, S), dtype=torch.float32, device=values.device)
    if T == 0 or S == 0:
        return gw
    if D == 0:
        return gw.zero_()
    block_s, block_d, warps, span = config or weight_grad_config(S, D, values.element_size())
    _weight_grad_kernel[(T, triton.cdiv(S, span))](
        indices, grad_out, values, gw, S, D, grad_out.stride(0), values.stride(0), span,
        BLOCK_S=block_s, BLOCK_D=block_d, ONE_CHUNK=D <= block_d, num_warps=warps,
    )
    return gw


def _sort_pairs(indices: torch.Tensor, n_rows: int):
    """(sorted_rows, perm): the pairs' rows in increasing order, and each sorted pair's flat index (stable); int32
    rows when n_rows < 2^31, perm int32 from the compiled sort (CUDA) or int64 from torch.sort."""
    flat = indices.reshape(-1)
    if cuda_sort.applies(flat, n_rows) and cuda_sort.available():
        return cuda_sort.sort_pairs(flat, n_rows)
    keys = flat.to(torch.int32) if n_rows < 2**31 else flat.to(torch.int64)  # 32-bit keys sort faster
    return torch.sort(keys, stable=True)


def _segments(sorted_rows: torch.Tensor, n_rows: int):
    """(seg_start [M+1], nseg [1], M) for the touched rows in order: segment k is the sorted pairs seg_start[k] ..
    seg_start[k + 1] of the k-th touched row; M = min(P, n_rows) bounds the number of touched rows, and the starts
    past the last segment are P. On the device, without a host sync."""
    P = sorted_rows.numel()
    new = torch.ones(P, dtype=torch.bool, device=sorted_rows.device)
    new[1:] = sorted_rows[1:] != sorted_rows[:-1]
    seg_id = torch.cumsum(new, 0)  # 1-based segment id of each sorted pair
    M = min(P, n_rows)
    # start of segment k = first position whose 1-based id exceeds k; k = nseg gives P (end of the last)
    seg_start = torch.searchsorted(seg_id, torch.arange(M + 1, device=seg_id.device, dtype=seg_id.dtype), right=True)
    return seg_start, seg_id[-1:], M


def _row_segments(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """row_start [n_rows + 1]: row r's pairs are the sorted pairs row_start[r] .. row_start[r + 1] (empty for a row
    no pair touched). One search, where _segments also needs a scan, and the dense form a list of untouched rows."""
    rows = torch.arange(n_rows + 1, device=sorted_rows.device, dtype=sorted_rows.dtype)
    return torch.searchsorted(sorted_rows, rows)


def run_pairs(P: int, compute_gw: bool) -> int:
    """Pairs per run of a hot row (0: no runs): 256, or more where P / 256 runs would pass 2^15 (the partial
    rows' buffer, at most 2^15 x D fp32, stays small). Only for a launch without the weights' gradient (the merged
    pass of ops/lookup_into_grad.py): with it, the run bookkeeping cost 0.25-0.5 ms on uniform rows
    (BENCHMARKS.md, "hot rows in chunks")."""
    return 0 if compute_gw else max(256, _npow2(triton.cdiv(P, 1 << 15)))


def _full_runs(seg_start: torch.Tensor, J: int, run: int):
    """(nfull [M], cum [M], run_seg [J]) over the M = len(seg_start) - 1 possible segments: full runs of `run`
    pairs per segment, their inclusive cumsum (run j of all segments in order belongs to the first segment whose cum
    exceeds j), and each run's segment (M past the last run). J >= the number of full runs (P // run). On the
    device, without a host sync."""
    lengths = seg_start[1:] - seg_start[:-1]  # [M]; 0 past the last segment
    nfull = lengths // run
    cum = torch.cumsum(nfull, 0)
    run_seg = torch.searchsorted(cum, torch.arange(J, device=seg_start.device, dtype=cum.dtype), right=True)
    return nfull, cum, run_seg


def _untouched_rows(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Rows of [0, n_rows) that no pair touched, in increasing order, in the first n_rows - nseg entries of an
    [n_rows + 1] int32/int64 tensor (the rest is unspecified). On the device, without a host sync."""
    dev = sorted_rows.device
    touched = torch.zeros(n_rows, dtype=torch.int32, device=dev)
    # index_fill_ takes the value as a kernel argument: `touched[rows] = 1` would copy a host scalar to the
    # device, which syncs the stream (and stalls the host once per memory layer in every backward).
    touched.index_fill_(0, sorted_rows.long(), 1)  # duplicates write the same value: deterministic
    rows = torch.arange(n_rows, device=dev, dtype=sorted_rows.dtype)
    # an untouched row's place among the untouched = its index minus the touched rows before it; touched rows
    # all go to the spare last entry (never read)
    place = rows - (torch.cumsum(touched, 0, dtype=sorted_rows.dtype) - touched)
    place = torch.where(touched.bool(), torch.full_like(place, n_rows), place)
    out = torch.empty(n_rows + 1, dtype=sorted_rows.dtype, device=dev)
    return out.scatter_(0, place.long(), rows)


def bwd_config(P: int, M: int, D: int, elem_bytes: int = 2):
    """(BLOCK_P, BLOCK_D, num_warps). A program waits out a chain of dependent loads (segment bounds -> row and
    pair ids -> output-gradient rows) and every column chunk of a row repeats it, so chunks are wide (up to 2048
    columns and 4 KiB, 32 B per thread) and rows of 1 KiB or more take one pair per loop step (a wider pair tile
    costs registers, hence occupancy, more than it saves). Narrow rows have many pairs each: BLOCK_P ~ half the
    mean number of pairs per touched row, <= 32 tile elements per thread (launch-config sweeps: BENCHMARKS.md)."""
    block_d = _col_block(D, max(16, min(2048, 4096 // elem_bytes)))
    warps = max(1, min(8, block_d * elem_bytes // 1024))
    if block_d * elem_bytes >= 1024:
        return 1, block_d, warps
    mean_seg = max(1, P // max(1, min(M, P)))
    block_p = max(1, min(_npow2(mean_seg) // 2, (32 * 32 * warps) // block_d))
    return block_p, block_d, warps


def lookup_backward(grad_out, indices, weights, values, compute_gw: bool = True,
                    sparse: bool = False, config=None, accumulate_into=None, run=None, run_config=None,
                    sum_squares_out=None, nonzero_rows_out=None):
    """Returns (grad_w fp32 [T, S] or None, grad_V) with grad_V dense [N, D], or for sparse=True the compact
    form (rows [M] int64 padded with -1, row_grads [M, D] whose padding rows are not written, nseg [1]);
    M = min(T*S, N).
    accumulate_into: a dense [N, D] gradient to add this lookup's value gradient to, in place (returned as grad_V);
    only the touched rows are read and written.
    run: pairs per run of a hot row (default run_pairs; 0: none); run_config: (BLOCK_P, num_warps) of the
    runs' launch (default the segment kernel's).
    sum_squares_out: a 0-dim fp32 tensor that receives the squared norm of the dense gradient as written (in its
    dtype), summed by the launch that writes it: the gradient-norm clip then needs no pass over a table-sized
    gradient. Only for the dense form written whole (not sparse, no accumulate_into).
    nonzero_rows_out: an [N] bool tensor that receives which rows some pair touched (every other row of the dense
    gradient is zero), read off the sorted pairs; same condition.

    `values` gives N, D and the default gradient dtype; its rows are read only for grad_w (compute_gw).
    grad_out may be a strided column view (unit stride along D)."""
    T, S = indices.shape
    N, D = values.shape
    dev = grad_out.device
    gv_dtype = values.dtype
    P = T * S
    if accumulate_into is not None and (sparse or accumulate_into.shape != (N, D) or accumulate_into.stride(1) != 1):
        raise ValueError("lookup_backward: accumulate_into must be a dense [N, D] gradient with unit column stride")
    for name, out in (("sum_squares_out", sum_squares_out), ("nonzero_rows_out", nonzero_rows_out)):
        if out is not None and (sparse or accumulate_into is not None):
            raise ValueError(f"lookup_backward: {name} needs the dense gradient written whole "
                             "(not sparse, no accumulate_into)")
    if P == 0 or D == 0:
        if sum_squares_out is not None:
            sum_squares_out.zero_()  # the gradient is all zeros
        if nonzero_rows_out is not None:
            nonzero_rows_out.zero_()  # no pairs, or rows without elements
        gw = torch.zeros((T, S), dtype=torch.float32, device=dev) if compute_gw else None
        if accumulate_into is not None:  # nothing to add
            return gw, accumulate_into
        if sparse:
            return gw, (torch.empty(0, dtype=torch.int64, device=dev), torch.empty((0, D), dtype=gv_dtype, device=dev),
                        torch.zeros(1, dtype=torch.int64, device=dev))
        return gw, torch.zeros((N, D), dtype=gv_dtype, device=dev)
    sorted_rows, perm = _sort_pairs(indices, N)
    # The dense form without the weights' gradient (the trainer's merged pass) gives each row of the table a program;
    # the other forms give each touched row one, and the dense form's untouched rows the programs after them. Row
    # programs measured faster for the merged pass and slower with the weights' gradient or the compact form
    # (BENCHMARKS.md, "programs by row").
    dense = not sparse and accumulate_into is None
    row_programs = dense and not compute_gw
    if row_programs:
        seg_start, M = _row_segments(sorted_rows, N), N
        nseg = seg_start  # not read with row programs
    else:
        seg_start, nseg, M = _segments(sorted_rows, N)
    if nonzero_rows_out is not None:
        if row_programs:  # row r has pairs when its range is not empty
            torch.gt(seg_start[1:], seg_start[:-1], out=nonzero_rows_out)
        else:
            nonzero_rows_out.zero_().index_fill_(0, sorted_rows.long(), True)
    block_p, block_d, warps = config or bwd_config(P, min(P, N), D, grad_out.element_size())
    n_d = triton.cdiv(D, block_d)
    gw_part = torch.empty((n_d, P), dtype=torch.float32, device=dev) if compute_gw else None
    if sparse:
        gv = torch.empty((M, D), dtype=gv_dtype, device=dev)
        rows_out = torch.empty(M, dtype=torch.int64, device=dev)
        untouched, grid = nseg, M  # untouched: unused
    elif accumulate_into is not None:
        gv = accumulate_into
        rows_out = nseg  # unused
        untouched, grid = nseg, M  # one program per possible segment; untouched rows are not written
    else:
        gv = torch.empty((N, D), dtype=gv_dtype, device=dev)
        rows_out = nseg  # unused
        # N programs, one per row of the table (with row programs, row r's own; else the nseg touched rows' segments,
        # then the N - nseg untouched rows): every row is written exactly once, untouched ones with zeros.
        untouched, grid = (nseg if row_programs else _untouched_rows(sorted_rows, N)), N
    # A row read by thousands of pairs (a training step's rows are far from uniform) would keep one program walking
    # them long after the rest: its full runs of `run` pairs are summed first, one program each.
    run = run_pairs(P, compute_gw) if run is None else run
    J = P // run if run > 0 else 0
    gw_out = gw_part if compute_gw else gv
    nfull = cum = part = nseg  # unused without runs
    if J > 0:
        nfull, cum, run_seg = _full_runs(seg_start, J, run)
        part = torch.empty((J, D), dtype=torch.float32, device=dev)
        run_p, run_warps = run_config or (block_p, warps)
        _run_partial_kernel[(J, n_d)](
            sorted_rows, perm, seg_start, run_seg, nfull, cum,
            weights, grad_out, values, gw_out, part,
            M, P, S, D, grad_out.stride(0), values.stride(0),
            RUN=run, BLOCK_P=run_p, BLOCK_D=block_d, COMPUTE_GW=compute_gw, num_warps=run_warps,
        )
    # The compact form runs on a 1-D grid (a segment's column chunks side by side), where it measured faster at every
    # width; the other forms measured the same or slower there (the merged pass much slower). Why the grid's shape
    # matters is not known (BENCHMARKS.md, "the compact form's stores").
    adjacent = n_d if sparse else 0
    # parts of 256 columns per program, summed below in a fixed order (deterministic, no atomics)
    sq_parts_per_program = max(1, block_d // 256)
    sq_parts = (torch.empty(grid * n_d * sq_parts_per_program, dtype=torch.float32, device=dev)
                if sum_squares_out is not None else nseg)
    # Prepared by segment so that a program's first loads depend on its segment's index only: the segment's row and
    # its first pair to walk, after any runs; that pair's loads are then peeled out of the walk, so only with one pair
    # per walk step (the same summation order). Row programs know their row, and the first pair slowed their launch
    # (the merged pass, with the runs' extra preparation: BENCHMARKS.md, "the segments' rows and first pairs
    # prepared").
    first_pair = block_p == 1 and not row_programs
    seg_rows = seg_first = nseg  # unused by row programs
    if not row_programs:
        starts = seg_start[:-1].clamp(max=P - 1)  # each segment's first sorted pair (P - 1 past the last segment)
        seg_rows = sorted_rows[starts]
        if first_pair:
            seg_first = perm[(seg_start[:-1] + nfull * run).clamp(max=P - 1) if J > 0 else starts]
    _segment_bwd_kernel[(grid * n_d,) if adjacent else (grid, n_d)](
        perm, seg_start, nseg, nfull, cum, part, seg_rows, seg_first,
        weights, grad_out, values, gw_out, gv, rows_out, untouched, sq_parts,
        P, S, D, grad_out.stride(0), values.stride(0), gv.stride(0),
        RUN=run, BLOCK_P=block_p, BLOCK_D=block_d, HAS_RUNS=J > 0, COMPUTE_GW=compute_gw, SPARSE=sparse,
        ZERO_UNTOUCHED=dense, ACCUMULATE=accumulate_into is not None,
        num_warps=warps, ADJACENT_CHUNKS=adjacent, ROW_PROGRAMS=row_programs,
        SUM_SQUARES=sum_squares_out is not None, SQ_PARTS=sq_parts_per_program, FIRST_PAIR=first_pair,
    )
    if sum_squares_out is not None:
        torch.sum(sq_parts, 0, out=sum_squares_out)
    gw = None
    if compute_gw:
        gw = (gw_part[0] if n_d == 1 else gw_part.sum(0)).view(T, S)  # fixed-order sum: deterministic
    if sparse:
        return gw, (rows_out, gv, nseg)
    return gw, gv


# ------------------------------------------------------------------------------------------------ custom ops
def _check(indices, weights, values):
    if indices.dim() != 2 or weights.shape != indices.shape or values.dim() != 2:
        raise ValueError(
            f"memory_lookup: need indices [T, S], weights [T, S], values [N, D]; got {tuple(indices.shape)}, "
            f"{tuple(weights.shape)}, {tuple(values.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"memory_lookup: indices must be int32 or int64, got {indices.dtype}")
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"memory_lookup: values must be float32/bfloat16/float16, got {values.dtype}")
    if values.stride(1) != 1:
        raise ValueError("memory_lookup: values must have unit stride along the value dim (a row-major table)")
    if not (indices.device == weights.device == values.device):
        raise ValueError(f"memory_lookup: tensors on different devices: {indices.device}, {weights.device}, "
                         f"{values.device}")


@torch.library.custom_op("mnemo::triton_memory_lookup", mutates_args=())
def _lookup_op(indices: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return lookup_forward(indices, weights, values)


@_lookup_op.register_fake
def _(indices, weights, values):
    return values.new_empty((indices.shape[0], values.shape[1]))


@torch.library.custom_op("mnemo::triton_memory_lookup_backward", mutates_args=())
def _lookup_bwd_op(grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                   values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gw, gv = lookup_backward(grad_out, indices, weights, values)
    return gw.to(weights.dtype), gv


@_lookup_bwd_op.register_fake
def _(grad_out, indices, weights, values):
    return torch.empty_like(weights), torch.empty_like(values)


def _setup(ctx, inputs, output):
    indices, weights, values = inputs
    ctx.save_for_backward(indices, weights, values)


def _backward(ctx, grad_out):
    indices, weights, values = ctx.saved_tensors
    gw, gv = _lookup_bwd_op(grad_out.contiguous(), indices, weights, values)
    return None, (gw if ctx.needs_input_grad[1] else None), (gv if ctx.needs_input_grad[2] else None)


_lookup_op.register_autograd(_backward, setup_context=_setup)


def memory_lookup(indices: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """indices [T, S] int32/int64, weights [T, S] float, values [N, D] fp32/bf16 -> out [T, D] in values.dtype
    (fp32 accumulation). Differentiable w.r.t. weights and values; the value gradient is dense (zeros on
    untouched rows). Indices must lie in [0, N) (not checked: a check needs a host sync)."""
    _check(indices, weights, values)
    return _lookup_op(indices.contiguous(), weights.contiguous(), values)


def memory_lookup_backward(grad_out, indices, weights, values, sparse: bool = False):
    """The lookup's backward without autograd, for callers that apply value gradients themselves.

    sparse=False: (grad_weights [T, S] in weights.dtype, grad_values [N, D] dense).
    sparse=True: (grad_weights, rows [M] int64, row_grads [M, D] in values.dtype, num_rows [1] int64), with
    M = min(T*S, N); entries past num_rows have row -1 and a gradient row that is not written (skip rows < 0), so
    a sparse optimizer can consume the padded buffers without a host sync."""
    _check(indices, weights, values)
    gw, gv = lookup_backward(grad_out.contiguous(), indices.contiguous(), weights.contiguous(), values, sparse=sparse)
    gw = gw.to(weights.dtype)
    if sparse:
        rows, row_grads, nseg = gv
        return gw, rows, row_grads, nseg
    return gw, gv
