"""Memory lookup whose value gradient is added straight into the table's `.grad` (one buffer for every layer).

A value table shared by several memory layers otherwise gets one table-sized gradient per layer from autograd,
summed by autograd's adds (each add reads two tables and writes one). Here each lookup's backward adds its rows
into the parameter's `.grad` itself, as Megatron's "main_grad" does, and returns no gradient for the table: the
first backward of a step (no `.grad` yet) writes the whole gradient, zeros included; every later one reads and
writes only the rows it touched. Gradient accumulation over micro-batches keeps working: `.grad` is only added to.

merge=True (several layers sharing one table): each lookup's backward computes only the weights' gradient, which the
layers below need at once (token order, ops "lookup_weight_grad"), and leaves its value-gradient work (output
gradient, indices, weights) on the table; when the backward pass ends (an autograd engine callback), one pass over
the pairs of every layer adds them all. Every touched row is then read and written once per backward instead of once
per layer, and a row's pairs from all layers are summed in fp32 before the one rounding (BENCHMARKS.md, "one value
gradient pass"). The pending work lives on the table parameter (`_pending_value_grads`), tagged with the backward
pass that left it: work left by a pass that failed is dropped, never added to a later one.

The merged pass, when it writes `.grad` whole, also keeps a summary of it: its squared norm, summed as the rows are
written (grad_sum_of_squares: gradient clipping then needs no second read of a table-sized gradient), and which rows
any pair touched (grad_nonzero_rows: every other row is zero, so a sparse value rule need not read it). The summary
holds only while `.grad` is that tensor, unchanged: a later pass that adds rows, or any in-place change through
torch, makes it unknown again.

Only for a leaf table without gradient hooks (a hook would never see the gradient). Eager only: the `.grad`
mutation is a side effect torch.compile must not trace (callers keep it out of compiled graphs).
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch


def _backend_fn(backend: str, device: torch.device, op: str = "lookup_backward"):
    from . import _resolve

    return _resolve(op, backend, device)


class _GradSummary(NamedTuple):
    """What the pass that wrote a table's `.grad` whole knows about it, valid while `.grad` is `grad`, unchanged."""
    grad: weakref.ref
    version: int
    sum_of_squares: torch.Tensor  # 0-dim fp32
    nonzero_rows: torch.Tensor  # [N] bool: rows some pair touched


def _add_value_grad(backend: str, table: torch.Tensor, grad_out, indices, weights, compute_gw: bool):
    """One lookup backward whose value gradient goes into table.grad (written whole when there is none yet, else
    added to its touched rows); returns the weights' gradient (None unless compute_gw)."""
    fn = _backend_fn(backend, table.device)
    whole = table.grad is None
    # Summarised by the pass without the weights' gradient only (the merged pass): with it, the sum cost the kernel
    # more than the separate reduction it saves (BENCHMARKS.md, "the value gradient's norm").
    summarise = whole and not compute_gw
    sq = torch.empty((), dtype=torch.float32, device=table.device) if summarise else None
    nonzero = torch.empty(table.shape[0], dtype=torch.bool, device=table.device) if summarise else None
    with torch.no_grad():
        gw, gv = fn(grad_out, indices, weights, table.detach(), compute_gw=compute_gw, accumulate_into=table.grad,
                    sum_squares_out=sq, nonzero_rows_out=nonzero)
    if whole:
        table.grad = gv
    # The kernels write .grad without bumping its version, which only torch's own in-place ops do.
    table._grad_summary = _GradSummary(weakref.ref(gv), gv._version, sq, nonzero) if summarise else None
    return gw


def _summary(table: torch.Tensor) -> Optional[_GradSummary]:
    """table's _GradSummary while it still describes table.grad, else None."""
    known = getattr(table, "_grad_summary", None)
    grad = table.grad
    if known is None or grad is None or known.grad() is not grad or grad._version != known.version:
        return None
    return known


def grad_sum_of_squares(table: torch.Tensor) -> Optional[torch.Tensor]:
    """The squared norm (fp32, on the device) of `table.grad` when the lookup backward that wrote it whole summed
    it and nothing has changed it since; else None (compute it from the gradient)."""
    known = _summary(table)
    return known.sum_of_squares if known is not None else None


def grad_nonzero_rows(table: torch.Tensor) -> Optional[torch.Tensor]:
    """[N] bool, False on rows of `table.grad` known to be zero (no lookup pair touched them), when the lookup
    backward that wrote it whole recorded them and nothing has changed it since; else None."""
    known = _summary(table)
    return known.nonzero_rows if known is not None else None


class _PendingValueGrads:
    """The value-gradient work of one table's lookups in one backward pass, added into its .grad when the pass ends."""

    def __init__(self, table: torch.Tensor, backend: str, task: int):
        self.table, self.backend, self.task = table, backend, task
        self.parts = []  # (grad_out [T, D], indices [T, S], weights [T, S]) in backward order

    def add_into_grad(self) -> None:
        self.table._pending_value_grads = None
        widths = {}  # parts of one slot count are concatenated into one pass (layers may differ in heads * knn)
        for part in self.parts:
            widths.setdefault(part[1].shape[1], []).append(part)
        for parts in widths.values():
            grad_out, indices, weights = (torch.cat([p[k] for p in parts]) for k in range(3))
            _add_value_grad(self.backend, self.table, grad_out, indices, weights, compute_gw=False)
        self.parts = []


def _pending_for(table: torch.Tensor, backend: str) -> _PendingValueGrads:
    """This backward pass's pending work on `table`, created (with its end-of-pass callback) by its first lookup."""
    task = torch._C._current_graph_task_id()
    pending = getattr(table, "_pending_value_grads", None)
    if pending is None or pending.task != task:  # the first lookup of this pass (or work left by a failed pass)
        pending = _PendingValueGrads(table, backend, task)
        table._pending_value_grads = pending
        torch.autograd.Variable._execution_engine.queue_callback(pending.add_into_grad)
    return pending


class _LookupIntoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weights, table, backend, merge):
        from . import memory_lookup

        ctx.save_for_backward(indices, weights)
        ctx.table, ctx.backend = table, backend  # the leaf parameter whose .grad receives the value gradient
        ctx.merge = merge
        return memory_lookup(indices, weights, table.detach(), backend=backend)

    @staticmethod
    def backward(ctx, grad_out):
        indices, weights = ctx.saved_tensors
        table = ctx.table
        grad_out = grad_out.contiguous()
        with torch.no_grad():
            if ctx.merge:
                gw = None
                if ctx.needs_input_grad[1]:
                    gw = _backend_fn(ctx.backend, table.device, "lookup_weight_grad")(
                        grad_out, indices, weights, table.detach())
                _pending_for(table, ctx.backend).parts.append((grad_out, indices, weights))
            else:
                gw = _add_value_grad(ctx.backend, table, grad_out, indices, weights, ctx.needs_input_grad[1])
        return None, (gw.to(weights.dtype) if gw is not None else None), None, None, None


def can_accumulate(table: torch.Tensor) -> bool:
    """Whether `table` may take its gradient through memory_lookup_into_grad (leaf, trainable, no tensor hooks)."""
    return (isinstance(table, torch.nn.Parameter) and table.is_leaf and table.requires_grad
            and not getattr(table, "_backward_hooks", None) and not hasattr(table, "device_mesh"))


def memory_lookup_into_grad(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                            backend: str = "auto", merge: bool = False) -> torch.Tensor:
    """ops.memory_lookup, with the table's gradient added into `table.grad` in backward (see the module docstring;
    merge: one value-gradient pass for all of a backward's lookups of this table, when the pass ends)."""
    if not can_accumulate(table):
        raise ValueError("memory_lookup_into_grad: the table must be a trainable leaf parameter without hooks")
    return _LookupIntoGrad.apply(indices.contiguous(), weights.contiguous(), table, backend, merge)
