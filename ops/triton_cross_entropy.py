"""Triton row kernel for ops/cross_entropy.py: per row of logits, loss = logsumexp(x) - x[target] (fp32) and,
in place, x <- (softmax(x) - one_hot(target)) * scale.

One program per row: pass 1 keeps a running max and sum of exponentials over blocks of the row (fp32), pass 2
re-reads the row (mostly from L2: a row is vocab * 2 bytes) and writes the gradient over it. Each logit is read
twice and written once, in its own dtype; nothing of fp32 row size goes to memory.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_xent_kernel(x_ptr, t_ptr, loss_ptr, V, stride, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    target = tl.load(t_ptr + row).to(tl.int32)
    # Read before pass 1, whose reductions are block-wide barriers: pass 2 overwrites this logit, and a warp
    # reading it after another warp's pass-2 store would see the gradient (Triton orders only shared memory).
    x_t = tl.load(base + target).to(tl.float32)
    m = -float("inf")
    s = 0.0
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, lse - x_t)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        cmask = cols < V
        x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(cols == target, p - 1.0, p) * scale
        tl.store(base + cols, p.to(x_ptr.dtype.element_ty), mask=cmask)


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """logits [C, V] (unit stride along V), targets [C] -> loss [C] fp32; logits overwritten by the gradient."""
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C == 0:
        return loss
    if logits.stride(1) != 1:
        raise ValueError("softmax_xent_: logits need unit stride along the vocabulary")
    _softmax_xent_kernel[(C,)](logits, targets.contiguous(), loss, V, logits.stride(0), float(scale),
                               BLOCK=4096, num_warps=8)
    return loss
