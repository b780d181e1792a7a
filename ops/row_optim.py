"""Row-sparse optimizer updates for a value table: only the rows with a non-zero gradient row move.

The value table's gradient is dense ([N, D], zero on the rows no token read), so "touched this step" is read off
the gradient: a row is touched when its row statistic is > 0 (max |g| for lazy Adam, sum of g^2 for row-wise
Adagrad). Untouched rows, and their optimizer state, are not written at all, so they stay bit-identical.

- lazy Adam: Adam's moments and decoupled weight decay applied to touched rows only; bias correction uses the
  parameter's step count (every call), as torch.optim.SparseAdam does. When every row is touched it is AdamW.
- row-wise Adagrad (as FBGEMM's / DLRM's row-wise Adagrad): one accumulator per row,
  acc_r += mean_j g_rj^2, then w_r -= lr * g_r / (sqrt(acc_r) + eps): N floats of state instead of 2 * N * D.
  Decoupled weight decay, also on touched rows only: w_r *= 1 - lr * weight_decay before the step.

Column-sharded tables pass `row_stat`: the statistic of the FULL row (all-reduced over the column shards by the
caller), so every shard agrees on which rows are touched and, for Adagrad, on the row's mean square; `n_cols` is
then the full row's width. Without it, the statistic is computed here from the local gradient.

fp32 master weights: a table stored in low precision (bf16) passes `master`, its fp32 copy [N, D]. The rule then
updates the master and writes each touched row of `param` as the master's row rounded to param's dtype; the gradient
may be bf16 too (read as fp32). Without `master`, `param` is updated in place in its own dtype.

Stochastic rounding instead of a master: `rounding_seed` (an int, e.g. from the step count) with a bf16 table and no
`master`. The rule computes in fp32 from the bf16 table and state and writes each result rounded to a bf16 neighbour
at random, up with probability (x - lower) / ulp: unbiased, so updates far below the table's rounding still move it in
expectation (round-to-nearest would drop them). Lazy Adam's moments may then be bf16 too (also rounded at random):
4 bytes of state per element instead of the master's and fp32 moments' 12. `rng_col0`: the first column's index in
the full table (a column shard), so every shard and replica draws the bits the whole table would at its columns.
Both backends draw the same bits (a 32-bit counter-based hash: random_bits16), cheap beside the update's arithmetic.

`nonzero_rows` ([N] bool, optional): the rows whose gradient may be non-zero. Every other gradient row is taken as
zero, and the Triton kernels do not read it (ops.grad_nonzero_rows: the lookup pass that wrote the gradient knows
which rows no pair touched), so lazy Adam's and Adagrad's "touched" test has nothing to read there. Given a gradient
that is indeed zero on those rows, every rule's result is the same bit for bit with or without it.

`grad_scale` (a device scalar, e.g. the gradient-clipping factor's inverse): the gradient is used divided by it, as
torch's fused AdamW does with its `grad_scale`, so the table's gradient needs no separate scaling pass. A given
`row_stat` must already be of the scaled gradient.

backend: "auto" (Triton on CUDA when the kernel imports: one program per row, rows that were not touched exit
after reading their gradient, no host sync), "reference" (index_select / index_copy_ over the touched rows; one
host sync to count them), "triton".
"""
from __future__ import annotations

from typing import Optional

import torch

RULES = ("lazy_adam", "rowwise_adagrad")


def touched_stat(rule: str, grad: torch.Tensor) -> torch.Tensor:
    """[N] fp32 per-row statistic of a [N, D] gradient: max |g| (lazy Adam) or sum g^2 (row-wise Adagrad).
    Norm reductions: no [N, D] temporary."""
    g = grad.float()
    if rule == "lazy_adam":
        return torch.linalg.vector_norm(g, float("inf"), dim=1)
    # A row whose squares all underflow in fp32 (every |g| < ~1e-22) counts as untouched: its Adagrad step
    # would be far below the table's rounding.
    return torch.linalg.vector_norm(g, 2, dim=1).square()


def _rows(stat: torch.Tensor) -> torch.Tensor:
    return (stat > 0).nonzero().squeeze(1)


def _known_zero(stat: torch.Tensor, nonzero_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The row statistic with the rows known to be zero set to 0 (whatever their gradient holds)."""
    return stat if nonzero_rows is None else torch.where(nonzero_rows, stat, torch.zeros_like(stat))


def _grad_rows(grad, rows, nonzero_rows, grad_scale) -> torch.Tensor:
    """fp32 gradient rows `rows`, divided by grad_scale, zero where nonzero_rows says so."""
    g = grad.index_select(0, rows).float()
    if nonzero_rows is not None:
        g = torch.where(nonzero_rows.index_select(0, rows)[:, None], g, torch.zeros_like(g))
    return g / grad_scale if grad_scale is not None else g


_U32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values (products masked to 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _U32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _U32
    return x ^ (x >> 16)


def random_bits16(seed: int, rows: torch.Tensor, cols: torch.Tensor, stream: int) -> torch.Tensor:
    """[len(rows), len(cols)] int32 in [0, 2^16): a counter-based hash of (seed, row, global column), so any subset
    of rows or a column shard (cols = its global column indices) draws what the whole table would there. Streams 0
    and 1 are the low and high halves of one 32-bit word, stream 2 the low half of a second; the Triton kernels
    compute the same words (ops/triton_row_optim.py: _random_bits), bit for bit."""
    s = _fmix32(torch.tensor(int(seed) & _U32, dtype=torch.int64, device=rows.device))
    r = _fmix32((rows.long() & _U32) ^ s)
    word = _fmix32((r[:, None] + ((cols.long()[None, :] * 0x9E3779B9) & _U32)) & _U32)
    if stream == 1:
        return (word >> 16).to(torch.int32)
    if stream == 2:
        word = _fmix32((word + 0x6A09E667) & _U32)
    return (word & 0xFFFF).to(torch.int32)


def round_stochastic(x: torch.Tensor, bits16: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounded to one of the two neighbours, up with probability (x - lower) / ulp given uniform
    16-bit `bits16`: added below bf16's last mantissa bit, then truncated (sign-magnitude: negatives alike)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + bits16) & -65536).view(torch.float32).to(torch.bfloat16)


def _rounder(rounding_seed: Optional[int], rows: torch.Tensor, n_cols: int, col0: int):
    """(x fp32 [rows, cols], target tensor, stream) -> x in the target's dtype: rounded at random when a seed is
    given and the target is bf16."""
    def rounded(x, like, stream):
        if rounding_seed is None or like.dtype != torch.bfloat16:
            return x.to(like.dtype)
        cols = torch.arange(col0, col0 + n_cols, device=x.device)
        return round_stochastic(x, random_bits16(rounding_seed, rows, cols, stream))
    return rounded


def _write_rows(param, master, rows, p, rounded) -> None:
    """The updated fp32 rows `p` into the master (when there is one) and the stored table."""
    if master is not None:
        master.index_copy_(0, rows, p.to(master.dtype))
    param.index_copy_(0, rows, rounded(p, param, 0))


@torch.no_grad()
def lazy_adam_reference(param, grad, exp_avg, exp_avg_sq, row_stat=None, *, lr, beta1, beta2, eps, weight_decay,
                        step: int, master=None, grad_scale=None, rounding_seed=None, rng_col0: int = 0,
                        nonzero_rows=None, every_row: bool = False) -> None:
    if every_row:
        rows = torch.arange(param.shape[0], device=param.device)
    else:
        rows = _rows(_known_zero(touched_stat("lazy_adam", grad), nonzero_rows) if row_stat is None else row_stat)
    if rows.numel() == 0:
        return
    rounded = _rounder(rounding_seed, rows, param.shape[1], rng_col0)
    # rows gathered in fp32 and written back in each tensor's own dtype
    g = _grad_rows(grad, rows, nonzero_rows, grad_scale)
    m = exp_avg.index_select(0, rows).float().lerp_(g, 1 - beta1)
    v = exp_avg_sq.index_select(0, rows).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.index_copy_(0, rows, rounded(m, exp_avg, 1))
    exp_avg_sq.index_copy_(0, rows, rounded(v, exp_avg_sq, 2))
    # torch.optim.AdamW's single-tensor formula, op for op: with every row touched the two agree exactly
    bias1, bias2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    p = (param if master is None else master).index_select(0, rows).float()
    p.mul_(1 - lr * weight_decay)
    p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-lr / bias1)
    _write_rows(param, master, rows, p, rounded)


@torch.no_grad()
def rowwise_adagrad_reference(param, grad, row_acc, row_stat=None, *, lr, eps, weight_decay,
                              n_cols: Optional[int] = None, master=None, grad_scale=None, rounding_seed=None,
                              rng_col0: int = 0, nonzero_rows=None) -> None:
    stat = _known_zero(touched_stat("rowwise_adagrad", grad), nonzero_rows) if row_stat is None else row_stat
    if grad_scale is not None and row_stat is None:
        stat = stat / (grad_scale.float() * grad_scale.float())
    rows = _rows(stat)
    if rows.numel() == 0:
        return
    acc = row_acc.index_select(0, rows).float().add_(stat.index_select(0, rows).float() / (n_cols or param.shape[1]))
    row_acc.index_copy_(0, rows, acc.to(row_acc.dtype))
    p = (param if master is None else master).index_select(0, rows).float()
    p.mul_(1 - lr * weight_decay)
    g = _grad_rows(grad, rows, nonzero_rows, grad_scale)
    p.sub_(g * (lr / (acc.sqrt() + eps)).unsqueeze(1))
    _write_rows(param, master, rows, p, _rounder(rounding_seed, rows, param.shape[1], rng_col0))


_LOW = (torch.bfloat16, torch.float16)


def _check_rounding(op: str, param, master, rounding_seed) -> None:
    if rounding_seed is not None and (master is not None or param.dtype != torch.bfloat16):
        raise ValueError(f"ops.{op}: stochastic rounding (rounding_seed) is for a bf16 table without a master")


def _check_nonzero_rows(op: str, param, nonzero_rows) -> None:
    if nonzero_rows is not None and (nonzero_rows.dtype != torch.bool or nonzero_rows.shape != param.shape[:1]
                                     or nonzero_rows.device != param.device):
        raise ValueError(f"ops.{op}: nonzero_rows must be a bool tensor of one entry per table row on the table's "
                         f"device, got {nonzero_rows.dtype} {tuple(nonzero_rows.shape)} on {nonzero_rows.device}")


def _triton_kernel(op: str, backend: str, param, grad, master, stochastic: bool, *state: torch.Tensor):
    """The Triton function for `op` when `backend` picks it for these tensors, else None (the reference)."""
    from . import _triton_impl

    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"ops.{op}: backend must be auto, reference or triton, got {backend!r}")
    if backend == "reference":
        return None
    tensors = [t for t in (param, grad, master, *state) if t is not None]
    if stochastic:  # bf16 table, state fp32 or bf16
        fits = all(t.dtype in (torch.float32, torch.bfloat16) for t in (grad, *state))
    else:
        fp32 = [t for t in (master, *state) if t is not None] + ([param] if master is None else [])
        fits = (all(t.dtype == torch.float32 for t in fp32) and grad.dtype in (torch.float32, *_LOW)
                and (master is None or param.dtype in _LOW))
    fits = fits and all(t.is_contiguous() for t in tensors)
    if backend == "triton":
        if not fits:
            raise RuntimeError(f"ops.{op}: the Triton kernel needs contiguous tables, gradients and state, fp32 but "
                               f"for a bf16/fp16 gradient and a bf16/fp16 table with an fp32 master (or a bf16 "
                               f"table and fp32/bf16 state with stochastic rounding)")
        return _triton_impl(op)
    if not (fits and param.is_cuda):
        return None
    try:
        return _triton_impl(op)
    except ImportError:
        return None


def lazy_adam_rows(param, grad, exp_avg, exp_avg_sq, row_stat=None, *, lr, beta1, beta2, eps, weight_decay,
                   step: int, master=None, grad_scale=None, rounding_seed=None, rng_col0: int = 0,
                   nonzero_rows=None, every_row: bool = False, backend: str = "auto") -> None:
    """In place on touched rows of param [N, D], exp_avg, exp_avg_sq ([N, D]) and master; `step` counts from 1.
    every_row: step every row, touched or not (AdamW); row_stat is then not read."""
    _check_rounding("lazy_adam_rows", param, master, rounding_seed)
    _check_nonzero_rows("lazy_adam_rows", param, nonzero_rows)
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, master=master,
              grad_scale=grad_scale, rounding_seed=rounding_seed, rng_col0=rng_col0, nonzero_rows=nonzero_rows,
              every_row=every_row)
    kernel = _triton_kernel("lazy_adam_rows", backend, param, grad, master, rounding_seed is not None, exp_avg,
                            exp_avg_sq)
    if kernel is not None:
        return kernel(param, grad, exp_avg, exp_avg_sq, row_stat, **kw)
    return lazy_adam_reference(param, grad, exp_avg, exp_avg_sq, row_stat, **kw)


def rowwise_adagrad_rows(param, grad, row_acc, row_stat=None, *, lr, eps, weight_decay,
                         n_cols: Optional[int] = None, master=None, grad_scale=None, rounding_seed=None,
                         rng_col0: int = 0, nonzero_rows=None, backend: str = "auto") -> None:
    """In place on touched rows of param [N, D], row_acc [N] and master; n_cols: the full row's width (default D)."""
    _check_rounding("rowwise_adagrad_rows", param, master, rounding_seed)
    _check_nonzero_rows("rowwise_adagrad_rows", param, nonzero_rows)
    kw = dict(lr=lr, eps=eps, weight_decay=weight_decay, n_cols=n_cols, master=master, grad_scale=grad_scale,
              rounding_seed=rounding_seed, rng_col0=rng_col0, nonzero_rows=nonzero_rows)
    kernel = _triton_kernel("rowwise_adagrad_rows", backend, param, grad, master, rounding_seed is not None, row_acc)
    if kernel is not None:
        return kernel(param, grad, row_acc, row_stat, **kw)
    return rowwise_adagrad_reference(param, grad, row_acc, row_stat, **kw)
