"""Triton row-sparse optimizer updates (see ops/row_optim.py for the rules).

One program per table row. Without a precomputed row statistic the program first reads its gradient row to
decide whether the row was touched (one pass over the gradient, which is dense anyway); an untouched row then
stops, writing nothing. A touched row is read and written once more (its gradient mostly from L2). No host sync:
the set of touched rows never leaves the device.

HAS_MASTER: `p_ptr` is the fp32 master copy and `w_ptr` the low-precision (bf16) table: the rule updates the master
and writes both, the table as the master rounded, in the same pass.

HAS_NONZERO: a row flagged False in `nz_ptr` (ops.row_optim's `nonzero_rows`) has a zero gradient: the program reads
none of it, for its statistic or its update (a row of no columns to the loops, and masked loads).

HAS_SCALE: every gradient is divided by the device scalar at `scale_ptr` as it is read (the clip factor, torch's
fused AdamW's `grad_scale` contract), so clipping needs no separate pass over the table's gradient; a precomputed
row statistic is taken as already scaled.

STOCHASTIC: no master; the bf16 table (and lazy Adam's bf16 moments) are written with stochastic rounding, the
random bits a hash of (`seed`, row, rng_col0 + column), so a column shard draws the bits the whole table would at its
columns and replicas of a shard draw the same ones. The hash is MurmurHash3's 32-bit finalizer, the same words as
ops/row_optim.random_bits16: about 20 integer operations per element for three 16-bit draws, where Philox's ten
rounds cost several times that and made the every-row update compute-bound (BENCHMARKS.md).
"""
import torch
import triton
import triton.language as tl

from .triton_cast import round_to


@triton.jit
def _row_stat(g_ptr, base, n_cols, SUM_SQ: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if SUM_SQ:
            acc += g * g
        else:
            acc = tl.maximum(acc, tl.abs(g))
    if SUM_SQ:
        return tl.sum(acc, axis=0)
    return tl.max(acc, axis=0)


@triton.jit
def _round_stochastic(x, bits):
    """fp32 -> the fp32 value of a bf16 neighbour of x, the upper one with probability (x - lower) / ulp: adding 16
    random bits below bf16's last mantissa bit and truncating (sign-magnitude, so this works for negatives too)."""
    xi = x.to(tl.uint32, bitcast=True)
    xi = (xi + (bits & 0xFFFF)) & 0xFFFF0000
    return xi.to(tl.float32, bitcast=True)


@triton.jit
def _round_stochastic_to(x, bits, dtype: tl.constexpr):
    """x rounded at random to a bf16 neighbour when it is stored as bf16; an fp32 store keeps it as it is."""
    if dtype == tl.bfloat16:
        return _round_stochastic(x, bits)
    else:
        return x


@triton.jit
def _fmix32(x):
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _random_bits(seed, row, cols, rng_col0):
    """16-bit draws for the table, the first and the second moment at (row, global columns): random_bits16's
    streams 0, 1, 2."""
    s = _fmix32(seed.to(tl.uint32))
    r = _fmix32(row.to(tl.uint32) ^ s)
    word = _fmix32(r + (cols + rng_col0).to(tl.uint32) * 0x9E3779B9)
    second = _fmix32(word + 0x6A09E667)
    return word & 0xFFFF, word >> 16, second & 0xFFFF


@triton.jit
def _random_bits_kernel(out_ptr, seed, n_cols, rng_col0, BLOCK: tl.constexpr):
    """The three streams of one row into out [3, rows, n_cols] (int32), column block by column block as the update
    kernels draw them: for tests against random_bits16."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_cols
    plane = tl.num_programs(0).to(tl.int64) * n_cols
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        b0, b1, b2 = _random_bits(seed, row, cols, rng_col0)
        tl.store(out_ptr + base + cols, b0.to(tl.int32), mask=mask)
        tl.store(out_ptr + plane + base + cols, b1.to(tl.int32), mask=mask)
        tl.store(out_ptr + 2 * plane + base + cols, b2.to(tl.int32), mask=mask)


@triton.jit
def _grad_cols(nz_ptr, row, n_cols, HAS_NONZERO: tl.constexpr):
    """How many of the row's gradient columns to read: all, or none for a row known to be zero."""
    if HAS_NONZERO:
        return tl.where(tl.load(nz_ptr + row) != 0, n_cols, 0)
    return n_cols


@triton.jit(do_not_specialize=["seed"])
def _lazy_adam_kernel(p_ptr, w_ptr, g_ptr, m_ptr, v_ptr, stat_ptr, nz_ptr, scale_ptr, n_cols, decay, beta1, beta2,
                      eps, step_size, bias2_sqrt, seed, rng_col0, EVERY_ROW: tl.constexpr, HAS_STAT: tl.constexpr,
                      HAS_NONZERO: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr,
                      STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    g_cols = _grad_cols(nz_ptr, row, n_cols, HAS_NONZERO)
    if EVERY_ROW:  # AdamW: no statistic to read, no branch
        stat = 1.0
    elif HAS_STAT:
        stat = tl.load(stat_ptr + row)
    else:
        stat = _row_stat(g_ptr, base, g_cols, False, BLOCK)  # max |g|: > 0 whatever the (positive) scale
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    if stat > 0:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g = tl.load(g_ptr + base + cols, mask=cols < g_cols, other=0.0).to(tl.float32)
            if HAS_SCALE:
                g = g / scale
            p = tl.load(p_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            m = m + (1 - beta1) * (g - m)
            v = v * beta2 + (1 - beta2) * (g * g)
            p = p * decay - step_size * (m / (tl.sqrt(v) / bias2_sqrt + eps))
            if STOCHASTIC:
                r_p, r_m, r_v = _random_bits(seed, row, cols, rng_col0)
                m = _round_stochastic_to(m, r_m, m_ptr.dtype.element_ty)
                v = _round_stochastic_to(v, r_v, v_ptr.dtype.element_ty)
                p = _round_stochastic_to(p, r_p, p_ptr.dtype.element_ty)
            # Each value is exact in its store's dtype here (fp32, or rounded to a bf16 neighbour): a plain conversion.
            tl.store(m_ptr + base + cols, m.to(m_ptr.dtype.element_ty), mask=mask)
            tl.store(v_ptr + base + cols, v.to(v_ptr.dtype.element_ty), mask=mask)
            tl.store(p_ptr + base + cols, p.to(p_ptr.dtype.element_ty), mask=mask)
            if HAS_MASTER:
                tl.store(w_ptr + base + cols, round_to(p, w_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _rowwise_adagrad_kernel(p_ptr, w_ptr, g_ptr, acc_ptr, stat_ptr, nz_ptr, scale_ptr, n_cols, inv_full_cols, decay,
                            lr, eps, seed, rng_col0, HAS_STAT: tl.constexpr, HAS_NONZERO: tl.constexpr,
                            HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    g_cols = _grad_cols(nz_ptr, row, n_cols, HAS_NONZERO)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_STAT:
        stat = tl.load(stat_ptr + row)
    else:
        stat = _row_stat(g_ptr, base, g_cols, True, BLOCK)
        if HAS_SCALE:
            stat = stat / (scale * scale)
    if stat > 0:
        acc = tl.load(acc_ptr + row) + stat * inv_full_cols
        # Every warp loads the scalar and one thread stores it: without the barrier a warp that loads late can
        # read the sum already stored and add the statistic twice. Triton orders shared memory, not global.
        tl.debug_barrier()
        tl.store(acc_ptr + row, acc)
        step = lr / (tl.sqrt(acc) + eps) / scale  # the gradient's scale folded into the row's step
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g = tl.load(g_ptr + base + cols, mask=cols < g_cols, other=0.0).to(tl.float32)
            p = tl.load(p_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            p = p * decay - step * g
            if STOCHASTIC:
                r_p, _, _ = _random_bits(seed, row, cols, rng_col0)
                p = _round_stochastic(p, r_p)
            tl.store(p_ptr + base + cols, p.to(p_ptr.dtype.element_ty), mask=mask)  # exact, as in lazy Adam
            if HAS_MASTER:
                tl.store(w_ptr + base + cols, round_to(p, w_ptr.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return min(1024, triton.next_power_of_2(max(n_cols, 16)))


def _adam_warps(block: int) -> int:
    """8 elements per thread: 16-byte loads of a bf16 table, gradient and moments (4 per thread, 8-byte loads, left
    the AdamW step over a large bf16 table well above its bandwidth floor: BENCHMARKS.md, value optimizer). The
    Adagrad kernel keeps 4 per thread: it was not measured at 8."""
    return max(1, min(8, block // 256))


def random_bits(seed: int, n_rows: int, n_cols: int, rng_col0: int = 0, device="cuda"):
    """[3, n_rows, n_cols] int32: the kernels' 16-bit draws of streams 0, 1, 2 (the table, the two moments)."""
    out = torch.empty((3, n_rows, n_cols), dtype=torch.int32, device=device)
    _random_bits_kernel[(n_rows,)](out, seed, n_cols, rng_col0, BLOCK=_block(n_cols))
    return out


def _check(param, *same):
    assert param.ndim == 2 and all(t.shape == param.shape for t in same), "row_optim: table and state shapes differ"


def lazy_adam_rows(param, grad, exp_avg, exp_avg_sq, row_stat=None, *, lr, beta1, beta2, eps, weight_decay,
                   step: int, master=None, grad_scale=None, rounding_seed=None, rng_col0: int = 0,
                   nonzero_rows=None, every_row: bool = False) -> None:
    _check(param, grad, exp_avg, exp_avg_sq, *([master] if master is not None else []))
    n_rows, n_cols = param.shape
    if n_rows == 0 or n_cols == 0:
        return
    bias1, bias2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    block = _block(n_cols)
    stat = row_stat.float().contiguous() if row_stat is not None else param  # unused pointer when no statistic
    p, w = (param, param) if master is None else (master, param)
    scale = grad_scale if grad_scale is not None else param  # unused pointer when no scale
    nz = nonzero_rows.contiguous() if nonzero_rows is not None else param  # unused pointer: every row is read
    _lazy_adam_kernel[(n_rows,)](p, w, grad, exp_avg, exp_avg_sq, stat, nz, scale, n_cols, 1 - lr * weight_decay,
                                 beta1, beta2, eps, lr / bias1, bias2_sqrt, rounding_seed or 0, rng_col0,
                                 EVERY_ROW=every_row, HAS_STAT=row_stat is not None,
                                 HAS_NONZERO=nonzero_rows is not None, HAS_MASTER=master is not None,
                                 HAS_SCALE=grad_scale is not None, STOCHASTIC=rounding_seed is not None, BLOCK=block,
                                 num_warps=_adam_warps(block))


def rowwise_adagrad_rows(param, grad, row_acc, row_stat=None, *, lr, eps, weight_decay, n_cols=None,
                         master=None, grad_scale=None, rounding_seed=None, rng_col0: int = 0,
                         nonzero_rows=None) -> None:
    _check(param, grad, *([master] if master is not None else []))
    assert row_acc.shape == param.shape[:1], "row_optim: the row accumulator needs one value per row"
    n_rows, local_cols = param.shape
    if n_rows == 0 or local_cols == 0:
        return
    block = _block(local_cols)
    stat = row_stat.float().contiguous() if row_stat is not None else param
    p, w = (param, param) if master is None else (master, param)
    scale = grad_scale if grad_scale is not None else param  # unused pointer when no scale
    nz = nonzero_rows.contiguous() if nonzero_rows is not None else param  # unused pointer: every row is read
    _rowwise_adagrad_kernel[(n_rows,)](p, w, grad, row_acc, stat, nz, scale, local_cols,
                                       1.0 / (n_cols or local_cols), 1 - lr * weight_decay, lr, eps,
                                       rounding_seed or 0, rng_col0, HAS_STAT=row_stat is not None,
                                       HAS_NONZERO=nonzero_rows is not None, HAS_MASTER=master is not None,
                                       HAS_SCALE=grad_scale is not None, STOCHASTIC=rounding_seed is not None,
                                       BLOCK=block,
                                       num_warps=max(1, min(8, block // 128)))
