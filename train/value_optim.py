"""AdamW for every group but the value table's, which takes a row-sparse rule (`optim.value_optimizer`).

One optimizer object, so the LR scheduler, gradient clipping, the non-finite guard and DCP checkpoints see the same
param_groups (and the same "values" group, at its own rate) as with plain AdamW:
- the "decay" / "no_decay" groups step through train/adamw.AdamW (torch's AdamW, its GPU update a Triton kernel);
- the "values" group steps row by row (ops/row_optim.py), only on the rows with a non-zero gradient this step:
  - sparse_adam ("lazy Adam"): state "exp_avg" / "exp_avg_sq" as large as the table (AdamW's names and shapes:
    a checkpoint's tensors mean the same thing), moved only on touched rows;
  - rowwise_adagrad: state "row_acc", one fp32 per row (N floats instead of AdamW's 2 * N * D).
  Value weight decay (optim.value_weight_decay, off by default) is decoupled and applied to touched rows only: a
  row no token reads is not shrunk either, as a lazy optimizer leaves it alone entirely. The group's learning
  rate follows the scheduler like AdamW's (optim.value_lr_scheduled).
  - adamw, only for a table stored in low precision (model.memory.value_dtype=bfloat16; an fp32 table steps through
    torch's AdamW with the other groups): lazy Adam's kernel with every row counted as touched, which is AdamW.

fp32 master weights: a value table stored in bf16 gets state "master", its fp32 copy, made from the table at the
first step (so weights loaded before it, e.g. checkpoint.init_from, seed it) and saved with the optimizer state (so
a resume continues exactly). Each step updates the master (fp32 moments or accumulator, bf16 gradient read as fp32)
and writes the touched rows of the table as the master rounded to bf16.

Stochastic rounding instead (optim.value_precision=bf16_stochastic, a bf16 table only): no master, moments in
bf16 for the Adam rules, the table and moments rounded at random to bf16 as each step writes them (unbiased, so
updates below bf16's resolution still count in expectation). State: 4 bytes per element instead of 12, and the
optimizer pass moves 14 bytes per element instead of 28. The random bits are keyed by the step count (saved with
the state) and the element's place in the full table: a resume continues exactly, every replica of a column shard
writes the same values. A resume cannot switch precision (train/resume.py refuses optimizer changes);
checkpoint.init_from starts a new run from the weights.

Rows no lookup touched: when the table's gradient was written whole by the lookups' merged pass, that pass recorded
which rows any pair touched (ops.grad_nonzero_rows), and the rules skip reading the other rows' gradient (zero by
construction): the sparse rules to find they were not touched, every-row AdamW in its update.

Gradient clipping inside the step: `optimizer.grad_scale` (a device scalar, None by default), which torch's fused
AdamW divides the other groups' gradients by, is honoured by the row rules too (the kernels divide as they read), so
a clip factor set there needs no separate pass over the value table's gradient.

Column-sharded value tables (DTensor, Replicate over replicas and Shard(1) over the memory-parallel ranks): each
rank updates its column slice; the per-row statistic that decides "touched" (and Adagrad's row mean square) is
all-reduced over the sharded mesh dims first (N floats), so every rank agrees on the touched rows and on the full
row's statistic. The row accumulator is a DTensor replicated on the table's mesh, so DCP saves it once.
"""
from __future__ import annotations

from typing import Dict, List, get_args

import torch
import torch.distributed as dist

import ops
from ops import row_optim

from .adamw import AdamW
from .config import ValuePrecision
from .distributed import local_tensor

# optim.value_optimizer (train/config.py ValueOptimizer) -> its row rule in ops/row_optim.py; adamw is lazy Adam
# over every row (used here only for a low-precision table, which needs the master copy)
_RULE = {"adamw": "lazy_adam", "sparse_adam": "lazy_adam", "rowwise_adagrad": "rowwise_adagrad"}
_PRECISIONS = get_args(ValuePrecision)


def _rounding_seed(step: int) -> int:
    """A different rounding seed per step, from the step count alone (resumes draw the same bits), below 2^31."""
    return (step * 0x9E3779B1 + 0x2545F491) % (2**31 - 1)


def _first_column(p: torch.Tensor) -> int:
    """Index in the full table of a column shard's first column (0 for a plain tensor): torch.chunk's split, as
    DTensor's Shard places it, nested over the mesh dims in order."""
    offset, size = 0, p.shape[1]
    for d in _sharded_dims(p):
        n, coord = p.device_mesh.size(d), p.device_mesh.get_coordinate()[d]
        chunk = -(-size // n)
        offset += min(coord * chunk, size)
        size = max(0, min(chunk, size - coord * chunk))
    return offset


def _sharded_dims(p: torch.Tensor) -> List[int]:
    """Mesh dims over which a DTensor's columns are split (empty for a plain tensor)."""
    from torch.distributed.tensor import Shard

    if not hasattr(p, "device_mesh"):
        return []
    return [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard) and pl.dim == 1]


class RowSparseValueAdamW(AdamW):
    """AdamW (train/adamw.py) whose "values" group steps with a row-sparse rule (see the module docstring)."""

    def __init__(self, params, value_optimizer: str, value_precision: str = "fp32_master", **adamw_kwargs):
        if value_optimizer not in _RULE:
            raise ValueError(f"optim.value_optimizer: must be one of {', '.join(_RULE)}, got {value_optimizer!r}")
        if value_precision not in _PRECISIONS:
            raise ValueError(f"optim.value_precision: must be one of {', '.join(_PRECISIONS)}, got {value_precision!r}")
        self.rule = _RULE[value_optimizer]
        self.every_row = value_optimizer == "adamw"
        self.value_precision = value_precision
        super().__init__(params, **adamw_kwargs)

    def _stochastic(self, p: torch.Tensor) -> bool:
        return self.value_precision == "bf16_stochastic" and p.dtype == torch.bfloat16

    def _state_dtype(self, p: torch.Tensor, key: str) -> torch.dtype:
        """The dtype of state tensor `key` of parameter p: bf16 moments with stochastic rounding, else fp32."""
        return torch.bfloat16 if self._stochastic(p) and key in ("exp_avg", "exp_avg_sq") else torch.float32

    def _step_group(self, group) -> bool:
        """The "values" group steps row by row here; AdamW steps the others."""
        if group.get("name") != "values":
            return False
        for p in group["params"]:
            if p.grad is not None:
                self._step_rows(p, group)
        return True

    def _init_state(self, p: torch.Tensor) -> Dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if self.rule == "lazy_adam":  # fp32 moments whatever the table's dtype, but for stochastic rounding
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p, dtype=self._state_dtype(p, key),
                                                  memory_format=torch.preserve_format)
            else:
                acc = torch.zeros(p.shape[0], dtype=torch.float32, device=local_tensor(p).device)
                if hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import DTensor, Replicate

                    acc = DTensor.from_local(acc, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
                state["row_acc"] = acc
        if p.dtype != torch.float32 and "master" not in state and not self._stochastic(p):
            state["master"] = p.detach().to(torch.float32, copy=True)
        return state

    def _step_rows(self, p: torch.Tensor, group: Dict) -> None:
        state = self._init_state(p)
        if state["step"].device.type != "cpu":  # a checkpoint load may put it beside the parameter: read it sync-free
            state["step"] = state["step"].cpu()
        state["step"] += 1
        param, grad = local_tensor(p), local_tensor(p.grad)
        master = local_tensor(state["master"]) if "master" in state else None
        grad_scale = self.grad_scale_on(param.device)
        row_stat = None
        dims = _sharded_dims(p)
        if dims and not self.every_row:
            # the full row's statistic: every column shard must see the same touched rows (and row mean square)
            row_stat = row_optim.touched_stat(self.rule, grad)
            op = dist.ReduceOp.MAX if self.rule == "lazy_adam" else dist.ReduceOp.SUM
            for d in dims:
                dist.all_reduce(row_stat, op=op, group=p.device_mesh.get_group(d))
            if grad_scale is not None and self.rule == "rowwise_adagrad":
                row_stat = row_stat / grad_scale.square()  # the statistic of the scaled gradient
        # None for a column-sharded table: its lookups never write .grad themselves (ops.can_accumulate)
        nonzero_rows = ops.grad_nonzero_rows(p)
        lr = float(group["lr"])
        step = int(state["step"].item())
        rounding = {}
        if self._stochastic(p):
            rounding = dict(rounding_seed=_rounding_seed(step), rng_col0=_first_column(p))
        if self.rule == "lazy_adam":
            beta1, beta2 = group["betas"]
            row_optim.lazy_adam_rows(param, grad, local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]),
                                     row_stat, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                     weight_decay=group["weight_decay"], step=step, master=master,
                                     grad_scale=grad_scale, nonzero_rows=nonzero_rows, every_row=self.every_row,
                                     **rounding)
        else:
            row_optim.rowwise_adagrad_rows(param, grad, local_tensor(state["row_acc"]), row_stat, lr=lr,
                                           eps=group["eps"], weight_decay=group["weight_decay"], n_cols=p.shape[1],
                                           master=master, grad_scale=grad_scale, nonzero_rows=nonzero_rows,
                                           **rounding)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes of optimizer state held by this rank, by group name (local shards of DTensors)."""
    out: Dict[str, int] = {}
    for group in optimizer.param_groups:
        total = 0
        for p in group["params"]:
            for t in optimizer.state.get(p, {}).values():
                if isinstance(t, torch.Tensor):
                    local = local_tensor(t)
                    total += local.numel() * local.element_size()
        out[group.get("name", "?")] = out.get(group.get("name", "?"), 0) + total
    return out
