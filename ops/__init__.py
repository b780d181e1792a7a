"""Memory-layer ops with backend dispatch.

backend: "auto" (Triton on CUDA tensors when the kernels import, else reference) | "reference" | "triton".
The Triton kernels live in ops/triton_*.py. On a machine with CUDA they are imported with this package (see
_preload_triton); without CUDA only when the triton backend is asked for, so CPU machines never need Triton.
A kernel that fails to import leaves "auto" on the reference. For bf16/fp16 queries on CUDA, "auto" searches with
ops/cuda_search.py (a compiled top-k, built at first use; the Triton kernel when it cannot be built), "triton" with
the Triton kernel (both exact for their scores, which may differ in the last bit). The Triton lookup backward sorts
its pairs with ops/cuda_sort.py (a compiled CUB sort, built at first use; torch.sort when it cannot be built).
"""
from __future__ import annotations

import importlib
import time

import torch

from . import cuda_sort, flash_attention, reference
from .cast import cast_table
from .cross_entropy import linear_cross_entropy
from .lookup_into_grad import can_accumulate, grad_nonzero_rows, grad_sum_of_squares, memory_lookup_into_grad

BACKENDS = ("auto", "reference", "triton")

# Triton dispatch: the one place that names the kernel modules. op name -> (module, function); an op missing
# here (or failing to import) falls back to the reference under "auto".
_TRITON_OPS = {
    "product_key_search": ("ops.triton_search", "product_key_search"),
    "memory_lookup": ("ops.triton_lookup", "memory_lookup"),
    "lookup_backward": ("ops.triton_lookup", "lookup_backward"),
    "lookup_weight_grad": ("ops.triton_lookup", "lookup_weight_grad"),
    "lazy_adam_rows": ("ops.triton_row_optim", "lazy_adam_rows"),
    "rowwise_adagrad_rows": ("ops.triton_row_optim", "rowwise_adagrad_rows"),
}


_TRITON_LOADED: dict = {}  # op name -> its function, or the ImportError of the failed import (tried once)
_CUDA_SEARCH: list = []  # ops.cuda_search once imported (CUDA machines); empty when it cannot import


def _triton_impl(op: str):
    """The Triton function for `op`; raises ImportError when it is not available."""
    if op not in _TRITON_LOADED:
        if op not in _TRITON_OPS:
            raise ImportError(f"ops: no Triton kernel registered for {op}")
        module, name = _TRITON_OPS[op]
        try:
            _TRITON_LOADED[op] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            _TRITON_LOADED[op] = ImportError(f"{module}.{name}: {e}")
    fn = _TRITON_LOADED[op]
    if isinstance(fn, ImportError):
        raise ImportError(str(fn))
    return fn


def _preload_triton() -> None:
    """Import the kernels now, outside any compiled region. torch.compile cannot trace an import: inside a compiled
    block it is a graph break, and a graph break inside an activation-checkpointed block makes dynamo run that
    whole block eagerly (the cost is in BENCHMARKS.md, activation checkpointing with compile)."""
    if torch.cuda.is_available():
        for op in _TRITON_OPS:
            try:
                _triton_impl(op)
            except ImportError:
                pass  # "auto" falls back to the reference; "triton" reports the error when it is used
        try:
            _CUDA_SEARCH.append(importlib.import_module("ops.cuda_search"))  # builds nothing until first used
        except ImportError:
            pass


def _resolve(op: str, backend: str, device: torch.device):
    if backend not in BACKENDS:
        raise ValueError(f"ops.{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return getattr(reference, op)
    if backend == "triton":
        try:
            return _triton_impl(op)
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"ops.{op}: backend 'triton' requested but the kernel is unavailable: {e}") from e
    if device.type == "cuda":  # auto
        try:
            return _triton_impl(op)
        except (ImportError, AttributeError):
            pass
    return getattr(reference, op)


def product_key_search(query, keys1, keys2, knn: int, backend: str = "auto"):
    """query [T, H, k_dim], keys1/keys2 [H, n_keys, k_dim//2] -> (scores [T, H, knn] fp32 sorted desc,
    indices [T, H, knn] int64 with slot = i1 * n_keys + i2). Exact; ties go to the lower slot index."""
    if backend == "auto" and query.dtype not in (torch.bfloat16, torch.float16):
        # The Triton search is fast on tensor cores (bf16/fp16); its exact fp32 path (no tensor cores) is slower
        # than the reference's matmul + topk (BENCHMARKS.md, memory kernels), so fp32 queries use the reference.
        backend = "reference"
    if backend == "auto" and _CUDA_SEARCH and _CUDA_SEARCH[0].applies(query, keys1, knn):
        return _CUDA_SEARCH[0].product_key_search(query, keys1, keys2, knn)
    return _resolve("product_key_search", backend, query.device)(query, keys1, keys2, knn)


def prepare_search(device, query_dtype, knn: int, n_keys: int, backend: str = "auto"):
    """Build (or load) the compiled CUDA search now when a memory layer with these settings would use it, so that
    its first build on a machine (about a minute) happens before training rather than inside the first step.
    Returns a line for the log, or None when the compiled search is not used here."""
    if backend != "auto" or not _CUDA_SEARCH:
        return None
    search = _CUDA_SEARCH[0]
    if not search.fits(torch.device(device).type == "cuda", query_dtype, knn, n_keys):
        return None
    return _build_note(search.available, "memory search: compiled CUDA top-k", "the Triton search runs")


def prepare_pair_sort(device, backend: str = "auto"):
    """Build (or load) now the lookup backward's compiled pair sort (ops/cuda_sort.py) when training on `device` with
    this backend would use it: its first build on a machine (about a minute and a half: CUB) then happens before
    training rather than inside the first backward. Returns a line for the log, or None when it is not used here."""
    if backend == "reference" or torch.device(device).type != "cuda":
        return None
    try:
        _triton_impl("lookup_backward")
    except ImportError:  # "auto" runs the reference backward (torch only); "triton" reports it when used
        return None
    return _build_note(cuda_sort.available, "memory lookup backward: compiled pair sort", "torch.sort runs")


def _build_note(available, what: str, fallback: str) -> str:
    """Build (or load) a compiled extension through its `available` and say how it went, in one log line."""
    start = time.perf_counter()
    if not available():  # warned once with the reason
        return f"{what} could not be built; {fallback}"
    return (f"{what} ready in {time.perf_counter() - start:.1f} s (built once per machine, then loaded from torch's "
            "extension cache)")


def memory_lookup(indices, weights, values, backend: str = "auto"):
    """indices [T, S] int32/int64, weights [T, S], values [N, D] -> [T, D] in values.dtype (fp32 accumulation)."""
    return _resolve("memory_lookup", backend, values.device)(indices, weights, values)


_preload_triton()

__all__ = ["BACKENDS", "product_key_search", "prepare_search", "prepare_pair_sort", "memory_lookup",
           "linear_cross_entropy", "cast_table", "memory_lookup_into_grad", "can_accumulate", "grad_sum_of_squares",
           "grad_nonzero_rows"]
