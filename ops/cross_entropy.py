"""Linear + softmax cross-entropy without the full logits: loss = mean_t CE(h_t W^T, target_t).

The output projection of a language model makes logits [tokens, vocab]: 16384 x 32000 tokens of one step are
1 GiB in bf16 and 2 GiB once upcast to fp32, and the plain `cross_entropy(logits.float(), targets)` writes and
reads several such tensors (the upcast, log-softmax, and their gradients). Here tokens are processed in chunks:
each chunk's logits are computed, turned in place into their gradient (softmax - one_hot) / tokens by one row
pass (`softmax_xent_`), and multiplied back at once into the chunk's input gradient and the weight gradient.
Forward therefore already holds both gradients; backward only scales them by the incoming gradient.
No chunk's logits outlive its iteration, and nothing of size tokens x vocab is stored for backward.

Precision follows what the plain path computes: under autocast the products run in the autocast dtype (the
logits are rounded to it, exactly as the autocast linear layer rounds them), and the softmax, log-sum-exp and
loss are fp32. The weight gradient is accumulated in fp32 over chunks. Without autocast everything is in the
inputs' dtype (fp32 on CPU: equal to the plain path within fp32 rounding).
"""
from __future__ import annotations

import torch

# Logit elements per chunk: bounds the chunk's logits (256 MiB in bf16) while keeping each chunk's matrix
# products large enough for full tensor-core efficiency.
CHUNK_ELEMENTS = 1 << 27


def softmax_xent_reference_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows of logits [C, V] -> per-row loss [C] (fp32, fp64 for fp64 logits); logits is overwritten with
    (softmax - one_hot) * scale."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, targets[:, None]).squeeze(1)
    grad = torch.exp(x - lse[:, None])
    grad.scatter_add_(1, targets[:, None], torch.full_like(grad[:, :1], -1.0))
    logits.copy_(grad.mul_(scale))
    return loss


def _triton_softmax_xent():
    try:
        from .triton_cross_entropy import softmax_xent_
    except ImportError:
        return None
    return softmax_xent_


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    if logits.is_cuda:
        fn = _triton_softmax_xent()
        if fn is not None:
            return fn(logits, targets, scale)
    return softmax_xent_reference_(logits, targets, scale)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


_ADDMM_OUT_DTYPE: dict = {}  # (device type, dtype) -> whether torch.addmm(..., out_dtype=float32) runs there


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 accumulator: inside the product (no rounding of a @ b, no extra pass) where torch's
    addmm takes out_dtype (newer torch, CUDA), else through an fp32 (or low-precision, upcast) product."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = (a.device.type, a.dtype)
    if _ADDMM_OUT_DTYPE.get(key, a.is_cuda):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE[key] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[key] = False
    acc += (a @ b).float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        T = h.shape[0]
        dt = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dt), weight.to(dt)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hc) if need_h else None
            acc = torch.promote_types(dt, torch.float32)  # fp32, or fp64 for fp64 inputs
            grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
            losses = torch.empty(T, dtype=acc, device=h.device)
            scale = 1.0 / max(T, 1)
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                logits = hc[s:e] @ wc.t()
                losses[s:e] = softmax_xent_(logits, targets[s:e], scale)
                if need_h:
                    torch.mm(logits, wc, out=grad_h[s:e])
                if need_w:
                    _addmm_fp32_(grad_w, logits.t(), hc[s:e])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return losses.sum() / max(T, 1)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # one multi-tensor kernel: an elementwise product with a 0-dim device tensor is not vectorised on CUDA
        present = [g for g in (grad_h, grad_w) if g is not None]
        scaled = iter(torch._foreach_mul(present, grad_out) if present else [])
        gh = next(scaled).to(h_dtype) if grad_h is not None else None
        gw = next(scaled).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None


# Eager inside compiled callers (a whole-model compile): each chunk is already a matmul, one Triton row pass and
# fused fp32 accumulation; tracing would unroll the chunk loop for nothing.
@torch.compiler.disable
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight^T against targets, never holding all the logits.

    h [T, D], weight [V, D], targets [T] int64 class indices in [0, V) (no ignore index). Differentiable in h and
    weight. chunk_tokens: tokens per chunk (default: CHUNK_ELEMENTS // V)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: need h [T, D], weight [V, D], targets [T]; got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, targets.long(), int(chunk_tokens))
