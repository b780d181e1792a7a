"""Causal attention through FlashAttention-4's CuTe kernels (the optional `flash-attn-4` package).

Inputs and output are [batch, seq, heads, head_dim], bf16 or fp16, on a CUDA GPU of compute capability 9.0 or newer
(the backward has no kernel for older chips); fewer key/value heads than query heads (GQA) are handled by the
kernels. The forward and the backward are torch custom ops, so torch.compile keeps a block in one graph around them:
the package's own autograd function is Python that dynamo cannot trace, which would split every block in two.

The package is imported on first use, never by `import ops`: the import loads its compiler (seconds), and machines
without it must not pay or fail. `flash4_problem` says, without importing it, why it cannot run here.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import warnings
from typing import Optional, Tuple

import torch

PACKAGE = "flash-attn-4"
DTYPES = (torch.bfloat16, torch.float16)
MIN_CAPABILITY = (9, 0)
AUX_DATA_WARNING = r"Argument aux_data \(position \d+\) cannot be converted to a JitArgument"


def installed_version() -> Optional[str]:
    """The installed flash-attn-4's version, or None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def flash4_problem(device: torch.device, dtype: Optional[torch.dtype], head_dim: int) -> Optional[str]:
    """Why FlashAttention-4 cannot run attention of `head_dim` on `device` with activations of `dtype` (None: fp32,
    no autocast), or None when it can. Does not import the package."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it runs on CUDA GPUs only (device {device})"
    if dtype not in DTYPES:
        return f"it needs bf16 or fp16 activations (precision {dtype or 'fp32'})"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"it needs compute capability 9.0 or newer (this GPU: {capability[0]}.{capability[1]})"
    # the kernels' head sizes: multiples of 8 up to 256 on Hopper, up to 128 on newer chips
    largest = 256 if capability[0] == 9 else 128
    if head_dim % 8 or not 8 <= head_dim <= largest:
        return (f"its kernels take head sizes that are multiples of 8 from 8 to {largest} (model.dim / model.n_heads "
                f"= {head_dim})")
    if installed_version() is None:
        return f"the {PACKAGE} package is not installed (pip install 'mnemo[flash4]')"
    return None


def _interface():
    module = "flash_attn.cute.interface"
    loaded = sys.modules.get(module)
    if loaded is not None:  # called per kernel launch: no import machinery, no warning-filter change
        return loaded
    try:
        interface = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"model.attention_backend=flash4 needs the {PACKAGE} package (pip install 'mnemo[flash4]'): "
                          f"{e}") from e
    # The package's own kernels make its compiler warn at every build about an argument it passes as None (a
    # compile-time constant there): a page of text per kernel in every training log, about nothing a user can change.
    # Installed once, at the import: changing the filters resets every "show once" warning's registry.
    warnings.filterwarnings("ignore", message=AUX_DATA_WARNING, category=UserWarning)
    return interface


def prepare() -> None:
    """Import the package now (its compiler loads for seconds), outside any timed or compiled region."""
    _interface()


@torch.library.custom_op("mnemo::flash4_forward", mutates_args=(), device_types="cuda")
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = _interface()._flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                                            return_lse=True)[:2]
    return out, lse


@_forward.register_fake
def _forward_fake(q, k, v):
    batch, seq, heads, _ = q.shape
    # the log-sum-exp of each query row, fp32, [batch, heads, seq] as the kernels write it
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((batch, heads, seq),
                                                                                  dtype=torch.float32)


@torch.library.custom_op("mnemo::flash4_backward", mutates_args=(), device_types="cuda")
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _interface()._flash_attn_bwd(
        q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), grad_out.contiguous(), lse,
        causal=True,
        # the query gradient is summed with atomics unless asked otherwise
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    return grads[0], grads[1], grads[2]


@_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, out, lse):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return _backward_op(grad_out, q, k, v, out, lse)


_forward.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, L, H, D] over k, v [B, L, Hkv, D] (H a multiple of Hkv), scaled by D**-0.5:
    [B, L, H, D]."""
    if not q.is_cuda or q.dtype not in DTYPES:
        raise ValueError(f"model.attention_backend=flash4: needs bf16/fp16 CUDA tensors, got {q.dtype} on {q.device}")
    return _forward(q, k, v)[0]
