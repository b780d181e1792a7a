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


def _write_rows(param, master, rows, p) -> None:
    """The updated fp32 rows `p` into the master (when there is one) and the stored table."""
    if master is not None:
        master.index_copy_(0, rows, p.to(master.dtype))
    param.index_copy_(0, rows, p.to(param.dtype))


@torch.no_grad()
def lazy_adam_reference(param, grad, exp_avg, exp_avg_sq, row_stat=None, *, lr, beta1, beta2, eps, weight_decay,
                        step: int, master=None, grad_scale=None) -> None:
    rows = _rows(touched_stat("lazy_adam", grad) if row_stat is None else row_stat)
    if rows.numel() == 0:
        return
    # rows gathered in fp32 and written back in each tensor's own dtype
    g = grad.index_select(0, rows).float()
    if grad_scale is not None:
        g = g / grad_scale
    m = exp_avg.index_select(0, rows).float().lerp_(g, 1 - beta1)
    v = exp_avg_sq.index_select(0, rows).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
    # torch.optim.AdamW's single-tensor formula, op for op: with every row touched the two agree exactly
    bias1, bias2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    p = (param if master is None else master).index_select(0, rows).float()
    p.mul_(1 - lr * weight_decay)
    p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-lr / bias1)
    _write_rows(param, master, rows, p)


@torch.no_grad()
def rowwise_adagrad_reference(param, grad, row_acc, row_stat=None, *, lr, eps, weight_decay,
                              n_cols: Optional[int] = None, master=None, grad_scale=None) -> None:
    stat = touched_stat("rowwise_adagrad", grad) if row_stat is None else row_stat
    if grad_scale is not None and row_stat is None:
        stat = stat / (grad_scale.float() * grad_scale.float())
    rows = _rows(stat)
    if rows.numel() == 0:
        return
    acc = row_acc.index_select(0, rows).float().add_(stat.index_select(0, rows).float() / (n_cols or param.shape[1]))
    row_acc.index_copy_(0, rows, acc.to(row_acc.dtype))
    p = (param if master is None else master).index_select(0, rows).float()
    p.mul_(1 - lr * weight_decay)
    g = grad.index_select(0, rows).float()
    if grad_scale is not None:
        g = g / grad_scale
    p.sub_(g * (lr / (acc.sqrt() + eps)).unsqueeze(1))
    _write_rows(param, master, rows, p)


_LOW = (torch.bfloat16, torch.float16)


def _triton_kernel(op: str, backend: str, param, grad, master, *state: torch.Tensor):
    """The Triton function for `op` when `backend` picks it for these tensors, else None (the reference)."""
    from . import _triton_impl

    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"ops.{op}: backend must be auto, reference or triton, got {backend!r}")
    if backend == "reference":
        return None
    tensors = [t for t in (param, grad, master, *state) if t is not None]
    fp32 = [t for t in (master, *state) if t is not None] + ([param] if master is None else [])
    fits = (all(t.is_contiguous() for t in tensors) and all(t.dtype == torch.float32 for t in fp32)
            and grad.dtype in (torch.float32, *_LOW) and (master is None or param.dtype in _LOW))
    if backend == "triton":
        if not fits:
            raise RuntimeError(f"ops.{op}: the Triton kernel needs contiguous tables, gradients and state, fp32 but "
                               f"for a bf16/fp16 gradient and a bf16/fp16 table with an fp32 master")
        return _triton_impl(op)
    if not (fits and param.is_cuda):
        return None
    try:
        return _triton_impl(op)
    except ImportError:
        return None


def lazy_adam_rows(param, grad, exp_avg, exp_avg_sq, row_stat=None, *, lr, beta1, beta2, eps, weight_decay,
                   step: int, master=None, grad_scale=None, backend: str = "auto") -> None:
    """In place on touched rows of param [N, D], exp_avg, exp_avg_sq ([N, D]) and master; `step` counts from 1."""
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, master=master,
              grad_scale=grad_scale)
    kernel = _triton_kernel("lazy_adam_rows", backend, param, grad, master, exp_avg, exp_avg_sq)
    if kernel is not None:
        return kernel(param, grad, exp_avg, exp_avg_sq, row_stat, **kw)
    return lazy_adam_reference(param, grad, exp_avg, exp_avg_sq, row_stat, **kw)


def rowwise_adagrad_rows(param, grad, row_acc, row_stat=None, *, lr, eps, weight_decay,
                         n_cols: Optional[int] = None, master=None, grad_scale=None, backend: str = "auto") -> None:
    """In place on touched rows of param [N, D], row_acc [N] and master; n_cols: the full row's width (default D)."""
    kw = dict(lr=lr, eps=eps, weight_decay=weight_decay, n_cols=n_cols, master=master, grad_scale=grad_scale)
    kernel = _triton_kernel("rowwise_adagrad_rows", backend, param, grad, master, row_acc)
    if kernel is not None:
        return kernel(param, grad, row_acc, row_stat, **kw)
    return rowwise_adagrad_reference(param, grad, row_acc, row_stat, **kw)
