"""Memory lookup whose value gradient is added straight into the table's `.grad` (one buffer for every layer).

A value table shared by several memory layers otherwise gets one table-sized gradient per layer from autograd,
summed by autograd's adds (each add reads two tables and writes one). Here each lookup's backward adds its rows
into the parameter's `.grad` itself, as Megatron's "main_grad" does, and returns no gradient for the table: the
first backward of a step (no `.grad` yet) writes the whole gradient, zeros included; every later one reads and
writes only the rows it touched. Gradient accumulation over micro-batches keeps working: `.grad` is only added to.

Only for a leaf table without gradient hooks (a hook would never see the gradient). Eager only: the `.grad`
mutation is a side effect torch.compile must not trace (callers keep it out of compiled graphs).
"""
from __future__ import annotations

import torch


def _backend_fn(backend: str, device: torch.device):
    from . import _resolve

    return _resolve("lookup_backward", backend, device)


class _LookupIntoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weights, table, backend):
        from . import memory_lookup

        ctx.save_for_backward(indices, weights)
        ctx.table, ctx.backend = table, backend  # the leaf parameter whose .grad receives the value gradient
        return memory_lookup(indices, weights, table.detach(), backend=backend)

    @staticmethod
    def backward(ctx, grad_out):
        indices, weights = ctx.saved_tensors
        table = ctx.table
        fn = _backend_fn(ctx.backend, table.device)
        with torch.no_grad():
            gw, gv = fn(grad_out.contiguous(), indices, weights, table.detach(), compute_gw=ctx.needs_input_grad[1],
                        accumulate_into=table.grad)
        if table.grad is None:
            table.grad = gv
        return None, (gw.to(weights.dtype) if gw is not None else None), None, None


def can_accumulate(table: torch.Tensor) -> bool:
    """Whether `table` may take its gradient through memory_lookup_into_grad (leaf, trainable, no tensor hooks)."""
    return (isinstance(table, torch.nn.Parameter) and table.is_leaf and table.requires_grad
            and not getattr(table, "_backward_hooks", None) and not hasattr(table, "device_mesh"))


def memory_lookup_into_grad(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                            backend: str = "auto") -> torch.Tensor:
    """ops.memory_lookup, with the table's gradient added into `table.grad` in backward (see the module docstring)."""
    if not can_accumulate(table):
        raise ValueError("memory_lookup_into_grad: the table must be a trainable leaf parameter without hooks")
    return _LookupIntoGrad.apply(indices.contiguous(), weights.contiguous(), table, backend)
