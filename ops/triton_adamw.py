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
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program: 8 fp32 per thread of 4 warps (the launch sweep in BENCHMARKS.md)
_WARPS = 4


@triton.jit
def _adamw_kernel(base_ptr, off_ptr, n_tensors, chunk_tensor_ptr, chunk_start_ptr, numel_ptr, scale_ptr,
                  lr, weight_decay, beta1, beta2, eps,
                  HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    c = tl.program_id(0)
    k = tl.load(chunk_tensor_ptr + c)
    start = tl.multiple_of(tl.load(chunk_start_ptr + c), BLOCK)
    n = tl.load(numel_ptr + k)
    # off_ptr: [5, n_tensors] element offsets from base_ptr of the parameters, gradients, first and second moments,
    # and step counts
    p_off = tl.load(off_ptr + k)
    g_off = tl.load(off_ptr + n_tensors + k)
    m_off = tl.load(off_ptr + 2 * n_tensors + k)
    v_off = tl.load(off_ptr + 3 * n_tensors + k)
    step = tl.load(base_ptr + tl.load(off_ptr + 4 * n_tensors + k))
    if VEC > 1:  # the host checked: 16-byte aligned buffers of a multiple of VEC elements
        n = tl.multiple_of(n, VEC)
        p_off = tl.multiple_of(p_off, VEC)
        g_off = tl.multiple_of(g_off, VEC)
        m_off = tl.multiple_of(m_off, VEC)
        v_off = tl.multiple_of(v_off, VEC)
    bias1 = 1 - tl.exp2(step * tl.log2(beta1))
    bias2_sqrt = tl.sqrt(1 - tl.exp2(step * tl.log2(beta2)))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
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


def _check_state(params, exp_avgs, exp_avg_sqs, steps) -> None:
    lists = (params, exp_avgs, exp_avg_sqs, steps)
    if len({len(ts) for ts in lists}) != 1:
        raise ValueError("adamw: params, exp_avgs, exp_avg_sqs and steps must be lists of one length")
    for p, m, v, s in zip(*lists):
        if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device == p.device for t in (p, m, v, s)):
            raise ValueError("adamw: every tensor must be a contiguous fp32 tensor on the parameters' device")
        if not (p.shape == m.shape == v.shape and s.numel() == 1):
            raise ValueError(f"adamw: shapes differ: param {tuple(p.shape)}, moments {tuple(m.shape)} / "
                             f"{tuple(v.shape)}, step {tuple(s.shape)}")


def _aligned(ptr: int, numel: int) -> bool:
    return ptr % 16 == 0 and numel % 4 == 0


class AdamWLaunch:
    """The kernel's launch over one list of parameters and their state (checked and tabled once): `step(grads, ...)`
    updates them. The gradients, new tensors every step, are checked and addressed at each call; the host work per
    call is a few attribute reads per tensor and one small copy to the device."""

    def __init__(self, params, exp_avgs, exp_avg_sqs, steps):
        _check_state(params, exp_avgs, exp_avg_sqs, steps)
        self.device = params[0].device if params else None
        self.n = len(params)
        keep = [i for i, p in enumerate(params) if p.numel() > 0]
        fixed = [[ts[i] for i in keep] for ts in (params, exp_avgs, exp_avg_sqs, steps)]
        self.keep = keep
        self.shapes = [p.shape for p in fixed[0]]
        # data addresses of the fixed tensors, per list: [4, n] (params, first and second moments, steps)
        self.fixed_ptrs = torch.tensor([[t.data_ptr() for t in ts] for ts in fixed], dtype=torch.int64)
        self.numels = torch.tensor([p.numel() for p in fixed[0]], dtype=torch.int64)
        self.vec_ok = torch.tensor([all(_aligned(t.data_ptr(), t.numel()) for t in (p, m, v))
                                    for p, m, v in zip(*fixed[:3])], dtype=torch.bool)
        self.fixed = fixed
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
            if not (g.dtype == torch.float32 and g.is_contiguous() and g.shape == shape):
                raise ValueError(f"adamw: a gradient must be a contiguous fp32 tensor shaped like its parameter "
                                 f"{tuple(shape)}, got {g.dtype} {tuple(g.shape)}")
        g_ptrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        if grads[0].device != self.device:
            raise ValueError(f"adamw: gradients on {grads[0].device}, parameters on {self.device}")
        vec = self.vec_ok & (g_ptrs % 16 == 0)
        ptrs = torch.cat([self.fixed_ptrs[:1], g_ptrs[None], self.fixed_ptrs[1:]])  # params, grads, moments, steps
        for part, width in ((vec.nonzero().flatten(), 4), ((~vec).nonzero().flatten(), 1)):
            if part.numel() == 0:
                continue
            table = self._table(part)
            sel = ptrs[:, part]
            # the base: the launch's lowest address (offsets >= 0); 16-byte accesses need it 16-byte aligned too
            row, col = divmod(int(sel.argmin()), part.numel())
            lists = (self.fixed[0], grads, *self.fixed[1:])
            base = lists[row][int(part[col])]
            if base.data_ptr() % 16:
                width = 1
            offsets = ((sel - base.data_ptr()) // 4).flatten()
            if base.is_cuda:
                offsets = offsets.pin_memory().to(base.device, non_blocking=True)
            scale = grad_scale if grad_scale is not None else base  # unused pointer without a scale
            _adamw_kernel[(table.n_chunks,)](
                base, offsets, part.numel(), table.chunk_tensor, table.chunk_start, table.numel, scale,
                lr, weight_decay, beta1, beta2, eps,
                HAS_SCALE=grad_scale is not None, BLOCK=BLOCK, VEC=width, num_warps=_WARPS)


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
               beta1: float, beta2: float, eps: float, grad_scale: Optional[torch.Tensor] = None) -> None:
    """One AdamW update of every params[i] in place (moments too), steps[i] already advanced to this step's count.
    A caller that steps the same tensors again keeps an AdamWLaunch instead (its checks and tables are built once)."""
    AdamWLaunch(params, exp_avgs, exp_avg_sqs, steps).step(grads, lr=lr, weight_decay=weight_decay, beta1=beta1,
                                                            beta2=beta2, eps=eps, grad_scale=grad_scale)
