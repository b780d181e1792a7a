"""AdamW over a list of fp32 tensors in one Triton launch: torch's fused AdamW update, at the copy ceiling.

torch's fused AdamW moves the 28 bytes per element of an fp32 update (parameter, gradient and two moments read; the
parameter and the moments written) at about 70% of an H200's copy bandwidth; this kernel moves them at ~99%
(BENCHMARKS.md, "the dense parameters' AdamW"). Program c updates chunk c of the list: a table gives each chunk its
tensor and first element, and each tensor's four buffers (and its step count) are addressed as element offsets from
one base pointer, the lowest address among them, so one launch covers tensors of any sizes without copying them into
one buffer. Tensors whose buffers are all 16-byte aligned with a multiple of 4 elements go to a launch with 16-byte
accesses; any others to a second one without.

The update is torch.optim.AdamW's (decoupled weight decay, bias corrections from each tensor's own step count, read on
the device: no host sync), with its fused kernels' `grad_scale` contract: gradients are divided by the device scalar
as they are read (the clip factor, train/optim.set_clip_scale). It agrees with torch's fused AdamW to fp32 rounding.

Master weights (`copies`): the fp32 tensors stepped are masters of bf16 copies that the model computes with. The
gradients are then the copies' (bf16, read as fp32) and each updated master is written to its copy rounded to
nearest even, the rounding of torch's `.to(torch.bfloat16)`, so the copy is what autocast would have cast the master
to. bf16 tensors are addressed from a second base pointer, the lowest of their addresses.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .triton_cast import bf16_nearest_even

BLOCK = 1024  # elements per program: 8 fp32 per thread of 4 warps (the launch sweep in BENCHMARKS.md)
_WARPS = 4


@triton.jit
def _adamw_kernel(base_ptr, half_ptr, off_ptr, n_tensors, chunk_tensor_ptr, chunk_start_ptr, numel_ptr, scale_ptr,
                  lr, weight_decay, beta1, beta2, eps,
                  HAS_SCALE: tl.constexpr, COPIES: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    c = tl.program_id(0)
    k = tl.load(chunk_tensor_ptr + c)
    start = tl.multiple_of(tl.load(chunk_start_ptr + c), BLOCK)
    n = tl.load(numel_ptr + k)
    # off_ptr: [6, n_tensors] element offsets from base_ptr of the parameters, gradients, first and second moments,
    # step counts and (unused without COPIES) the copies; with COPIES the gradients' and copies' offsets are from
    # half_ptr, in bf16 elements
    p_off = tl.load(off_ptr + k)
    g_off = tl.load(off_ptr + n_tensors + k)
    m_off = tl.load(off_ptr + 2 * n_tensors + k)
    v_off = tl.load(off_ptr + 3 * n_tensors + k)
    step = tl.load(base_ptr + tl.load(off_ptr + 4 * n_tensors + k))
    c_off = tl.load(off_ptr + 5 * n_tensors + k)
    if VEC > 1:  # the host checked: 16-byte aligned buffers of a multiple of VEC elements
        n = tl.multiple_of(n, VEC)
        p_off = tl.multiple_of(p_off, VEC)
        g_off = tl.multiple_of(g_off, VEC)
        m_off = tl.multiple_of(m_off, VEC)
        v_off = tl.multiple_of(v_off, VEC)
        c_off = tl.multiple_of(c_off, VEC)
    bias1 = 1 - tl.exp2(step * tl.log2(beta1))
    bias2_sqrt = tl.sqrt(1 - tl.exp2(step * tl.log2(beta2)))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    if COPIES:
        g = tl.load(half_ptr + g_off + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(base_ptr + g_off + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(tl.float32)
    p = tl.load(base_ptr + p_off + offs, mask=mask, other=0.0)
    m = tl.load(base_ptr + m_off + offs, mask=mask, other=0.0)
    v = tl.load(base_ptr + v_off + offs, mask=mask, other=0.0)
    p = p - (lr * weight_decay) * p
    m = m + (1 - beta1) * (g - m)
    v = v * beta2 + (1 - beta2) * (g * g)
    p = p - (lr / bias1) * (m / (tl.sqrt(v) / bias2_sqrt + eps))
    tl.store(base_ptr + m_off + offs, m, mask=mask)
    tl.store(base_ptr + v_off + offs, v, mask=mask)
    tl.store(base_ptr + p_off + offs, p, mask=mask)
    if COPIES:
        tl.store(half_ptr + c_off + offs, bf16_nearest_even(p), mask=mask)


def _check_state(params, exp_avgs, exp_avg_sqs, steps, copies) -> None:
    lists = (params, exp_avgs, exp_avg_sqs, steps) + ((copies,) if copies is not None else ())
    if len({len(ts) for ts in lists}) != 1:
        raise ValueError("adamw: params, exp_avgs, exp_avg_sqs, steps (and copies) must be lists of one length")
    for p, m, v, s in zip(*lists[:4]):
        if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device == p.device for t in (p, m, v, s)):
            raise ValueError("adamw: every tensor must be a contiguous fp32 tensor on the parameters' device")
        if not (p.shape == m.shape == v.shape and s.numel() == 1):
            raise ValueError(f"adamw: shapes differ: param {tuple(p.shape)}, moments {tuple(m.shape)} / "
                             f"{tuple(v.shape)}, step {tuple(s.shape)}")
    for p, c in zip(params, copies or ()):
        if not (c.dtype == torch.bfloat16 and c.is_contiguous() and c.device == p.device and c.shape == p.shape):
            raise ValueError(f"adamw: a copy must be a contiguous bf16 tensor shaped like its master {tuple(p.shape)} "
                             f"on its device, got {c.dtype} {tuple(c.shape)} on {c.device}")


def _aligned(t: torch.Tensor) -> bool:
    """Whether t can be read 4 elements at a time (the vector launch): its address a multiple of 4 elements' bytes
    (16 for fp32, 8 for bf16) and its size a multiple of 4."""
    return t.data_ptr() % (4 * t.element_size()) == 0 and t.numel() % 4 == 0


# rows of the kernel's offset table
_P, _G, _M, _V, _STEP, _COPY = range(6)


class AdamWLaunch:
    """The kernel's launch over one list of parameters and their state (checked and tabled once): `step(grads, ...)`
    updates them. The gradients, new tensors every step, are checked and addressed at each call; the host work per
    call is a few attribute reads per tensor and one small copy to the device.

    copies: bf16 tensors the parameters are the fp32 masters of; the gradients are then the copies' (bf16), and each
    step writes the updated masters to them (see the module docstring)."""

    def __init__(self, params, exp_avgs, exp_avg_sqs, steps, copies=None):
        _check_state(params, exp_avgs, exp_avg_sqs, steps, copies)
        self.device = params[0].device if params else None
        self.n = len(params)
        self.grad_dtype = torch.bfloat16 if copies is not None else torch.float32
        keep = [i for i, p in enumerate(params) if p.numel() > 0]
        # the fixed tensors by table row (the gradients' row filled at each step)
        self.rows = [[t[i] for i in keep] for t in (params, params, exp_avgs, exp_avg_sqs, steps,
                                                     copies if copies is not None else params)]
        self.keep = keep
        self.shapes = [p.shape for p in self.rows[_P]]
        self.fixed_ptrs = torch.tensor([[t.data_ptr() for t in ts] for ts in self.rows], dtype=torch.int64)
        self.numels = torch.tensor([p.numel() for p in self.rows[_P]], dtype=torch.int64)
        self.vec_ok = torch.tensor([all(_aligned(self.rows[r][i]) for r in (_P, _M, _V, _COPY))
                                    for i in range(len(keep))], dtype=torch.bool)
        self._tables = {}  # (indices of a launch) -> ChunkTable

    def _table(self, part: torch.Tensor) -> "ChunkTable":
        key = tuple(part.tolist())
        if key not in self._tables:
            self._tables[key] = ChunkTable(self.numels[part].tolist(), self.device)
        return self._tables[key]

    def step(self, grads: Sequence[torch.Tensor], *, lr: float, weight_decay: float, beta1: float, beta2: float,
             eps: float, grad_scale: Optional[torch.Tensor] = None) -> None:
        """One AdamW update of every parameter with grads[i] its gradient (steps already advanced)."""
        if len(grads) != self.n:
            raise ValueError("adamw: one gradient per parameter")
        if not self.keep:
            return
        grads = [grads[i] for i in self.keep]
        for g, shape in zip(grads, self.shapes):
            if not (g.dtype == self.grad_dtype and g.is_contiguous() and g.shape == shape):
                name = "bf16" if self.grad_dtype == torch.bfloat16 else "fp32"
                raise ValueError(f"adamw: a gradient must be a contiguous {name} tensor shaped like its "
                                 f"parameter {tuple(shape)}, got {g.dtype} {tuple(g.shape)}")
        if grads[0].device != self.device:
            raise ValueError(f"adamw: gradients on {grads[0].device}, parameters on {self.device}")
        rows = list(self.rows)
        rows[_G] = grads
        ptrs = self.fixed_ptrs.clone()
        ptrs[_G] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        # (a gradient is shaped like its parameter, whose size vec_ok checked)
        vec = self.vec_ok & (ptrs[_G] % (4 * grads[0].element_size()) == 0)
        copies = self.grad_dtype == torch.bfloat16
        # rows addressed from the fp32 base and from the bf16 one (none without copies; the copies' row unused then)
        full_rows = [_P, _M, _V, _STEP] + ([] if copies else [_G])
        half_rows = [_G, _COPY] if copies else []
        for part, width in ((vec.nonzero().flatten(), 4), ((~vec).nonzero().flatten(), 1)):
            if part.numel() == 0:
                continue
            table = self._table(part)
            offsets = torch.zeros((6, part.numel()), dtype=torch.int64)
            bases = []
            for which in (full_rows, half_rows):
                if not which:
                    bases.append(None)
                    continue
                sel = ptrs[which][:, part]
                # the base: the lowest address of these rows (offsets >= 0); wide accesses need it aligned too
                row, col = divmod(int(sel.argmin()), part.numel())
                base = rows[which[row]][int(part[col])]
                if base.data_ptr() % (4 * base.element_size()):
                    width = 1
                offsets[which] = (sel - base.data_ptr()) // base.element_size()
                bases.append(base)
            base, half = bases
            offsets = offsets.flatten()
            if base.is_cuda:
                offsets = offsets.pin_memory().to(base.device, non_blocking=True)
            scale = grad_scale if grad_scale is not None else base  # unused pointers: the base
            _adamw_kernel[(table.n_chunks,)](
                base, half if half is not None else base, offsets, part.numel(), table.chunk_tensor,
                table.chunk_start, table.numel, scale, lr, weight_decay, beta1, beta2, eps,
                HAS_SCALE=grad_scale is not None, COPIES=copies, BLOCK=BLOCK, VEC=width, num_warps=_WARPS)


class ChunkTable:
    """Which tensor and first element each program of a launch takes, for tensors of the given sizes (built once per
    list of sizes, on the device)."""

    def __init__(self, numels: Sequence[int], device):
        numel = torch.tensor(numels, dtype=torch.int64)
        counts = (numel + BLOCK - 1) // BLOCK
        chunk_tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first = torch.cumsum(counts, 0) - counts  # each tensor's first chunk
        chunk_start = (torch.arange(len(chunk_tensor)) - first[chunk_tensor]) * BLOCK
        self.n_chunks = len(chunk_tensor)
        self.chunk_tensor = chunk_tensor.to(device=device, dtype=torch.int32)
        self.chunk_start = chunk_start.to(device)
        self.numel = numel.to(device)


def adamw_step(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
               exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], *, lr: float, weight_decay: float,
               beta1: float, beta2: float, eps: float, grad_scale: Optional[torch.Tensor] = None,
               copies: Optional[List[torch.Tensor]] = None) -> None:
    """One AdamW update of every params[i] in place (moments too), steps[i] already advanced to this step's count;
    with `copies`, grads are theirs and each updated params[i] is written to copies[i] (AdamWLaunch).
    A caller that steps the same tensors again keeps an AdamWLaunch instead (its checks and tables are built once)."""
    AdamWLaunch(params, exp_avgs, exp_avg_sqs, steps, copies).step(grads, lr=lr, weight_decay=weight_decay,
                                                                   beta1=beta1, beta2=beta2, eps=eps,
                                                                   grad_scale=grad_scale)
