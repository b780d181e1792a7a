"""The value table's optimizer step alone: fused AdamW against the row-sparse rules (ops/row_optim.py), on one GPU.

    python scripts/bench_value_optim.py [--rows 1048576] [--dim 1024] [--touched 1.0,0.5,0.1] [--iters 20]
    python scripts/bench_value_optim.py --bf16-table [--rows 1048576] [--dim 1024] [--touched 0.6,0.1] [--iters 20]

A random fp32 table and a gradient whose rows are non-zero with probability --touched (a lookup's gradient:
rows not read are exactly zero). Prints ms per step for each rule and backend (Triton kernel, torch reference),
and first checks on a small table that the Triton kernels match the reference and leave untouched rows alone.

--bf16-table: the memory presets' value step instead (optim.value_precision=bf16_stochastic with AdamW: a bf16 table,
bf16 gradient and moments, every row updated): the Triton kernel with stochastic rounding, the same told for each
--touched share which rows' gradient is zero (nonzero_rows), and the table gradient's
norm as torch._foreach_norm and as torch.linalg.vector_norm, each against its byte floor at the copy ceiling.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops import row_optim  # noqa: E402

HYPER = dict(lr=1e-3, eps=1e-8, weight_decay=0.1)


def step_fn(rule: str, p, g, state, backend: str, stat=None, nonzero_rows=None):
    if rule == "lazy_adam":
        return lambda: row_optim.lazy_adam_rows(p, g, *state, stat, beta1=0.9, beta2=0.95, step=5, backend=backend,
                                                nonzero_rows=nonzero_rows, **HYPER)
    return lambda: row_optim.rowwise_adagrad_rows(p, g, *state, stat, backend=backend, nonzero_rows=nonzero_rows,
                                                  **HYPER)


def new_state(rule: str, p):
    return [torch.zeros_like(p), torch.zeros_like(p)] if rule == "lazy_adam" else [torch.zeros(p.shape[0], device=p.device)]


def timed_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def sparse_grad(rows: int, dim: int, touched: float) -> torch.Tensor:
    return torch.randn(rows, dim, device="cuda") * (torch.rand(rows, 1, device="cuda") < touched)


@torch.no_grad()
def check(dim: int) -> None:
    p0, g = torch.randn(4096, dim, device="cuda"), sparse_grad(4096, dim, 0.3)
    untouched = (g == 0).all(dim=1)
    for rule in row_optim.RULES:
        out = {}
        for backend in ("reference", "triton"):
            p, state = p0.clone(), new_state(rule, p0)
            for _ in range(3):
                step_fn(rule, p, g, state, backend)()
            out[backend] = p
        diff = (out["reference"] - out["triton"]).abs().max().item()
        same = torch.equal(out["triton"][untouched], p0[untouched])
        print(f"check {rule}: triton vs reference max |diff| {diff:.2e}, untouched rows bit-identical: {same}")
        assert diff < 1e-5 and same


@torch.no_grad()
def bench_bf16_table(rows: int, dim: int, iters: int, touched) -> None:
    """The every-row bf16 update (bytes: read table, gradient, two moments; write table and moments: 14 per element),
    the same told which rows' gradient is zero (nonzero_rows, a share `touched` of the rows: 12 bytes per element
    plus 2 per touched one) and the gradient's norm (2 bytes per element read)."""
    bf16 = torch.bfloat16
    p = (torch.randn(rows, dim, device="cuda") * 0.03).to(bf16)
    g = (torch.randn(rows, dim, device="cuda") * 1e-3).to(bf16)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    scale = torch.tensor(1.5, device="cuda")
    from bench_memory import copy_ceiling  # this directory: the device-to-device copy's TB/s

    ceiling = copy_ceiling()
    n = rows * dim
    res = {}
    def update(nonzero_rows=None):
        return lambda: row_optim.lazy_adam_rows(p, g, m, v, every_row=True, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                                                weight_decay=0.1, step=5, grad_scale=scale, rounding_seed=12345,
                                                nonzero_rows=nonzero_rows, backend="triton")

    res["update with stochastic rounding"] = (timed_ms(update(), iters), 14 * n)
    for frac in touched:
        nonzero = torch.rand(rows, device="cuda") < frac
        res[f"the same, {frac:.0%} of rows' gradient read (nonzero_rows)"] = (
            timed_ms(update(nonzero), iters), 12 * n + 2 * int(nonzero.sum()) * dim)
    res["gradient norm, torch._foreach_norm"] = (
        timed_ms(lambda: torch._foreach_norm([g], 2.0, dtype=torch.float32), iters), 2 * n)
    res["gradient norm, torch.linalg.vector_norm"] = (
        timed_ms(lambda: torch.linalg.vector_norm(g, 2.0, dtype=torch.float32), iters), 2 * n)
    print(f"bf16 table {rows} x {dim}, copy ceiling {ceiling:.2f} TB/s")
    for k, (ms, nbytes) in res.items():
        floor = nbytes / (ceiling * 1e12) * 1e3
        print(f"  {k}: {ms:.2f} ms (floor {floor:.2f} ms, {ms / floor:.2f}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--touched", default="1.0,0.5,0.1")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--bf16-table", action="store_true", help="the bf16 table's stochastic-rounding step (see above)")
    args = ap.parse_args()
    if args.bf16_table:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
        bench_bf16_table(args.rows, args.dim, args.iters, list(map(float, args.touched.split(","))))
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, table {args.rows} x {args.dim} fp32")
    check(args.dim)
    p = torch.nn.Parameter(torch.randn(args.rows, args.dim, device="cuda") * 0.03)
    for frac in map(float, args.touched.split(",")):
        p.grad = sparse_grad(args.rows, args.dim, frac)
        adamw = torch.optim.AdamW([p], lr=1e-3, fused=True)
        res = {"AdamW fused (dense)": timed_ms(adamw.step, args.iters)}
        del adamw
        with torch.no_grad():
            for rule in row_optim.RULES:
                state = new_state(rule, p)
                for backend in ("triton", "reference"):
                    res[f"{rule} {backend}"] = timed_ms(step_fn(rule, p.data, p.grad, state, backend), args.iters)
                # as a column-sharded table runs it: the row statistic computed (and all-reduced) first
                stat_fn = lambda: row_optim.touched_stat(rule, p.grad)  # noqa: E731
                stat = stat_fn()
                res[f"{rule} triton + statistic first"] = (timed_ms(stat_fn, args.iters) + timed_ms(
                    step_fn(rule, p.data, p.grad, state, "triton", stat), args.iters))
                # told which rows are zero (ops.grad_nonzero_rows, from the lookup pass that wrote the gradient)
                nonzero = (p.grad != 0).any(dim=1)
                res[f"{rule} triton, nonzero_rows given"] = timed_ms(
                    step_fn(rule, p.data, p.grad, state, "triton", nonzero_rows=nonzero), args.iters)
                del state
        print(f"rows touched {frac:.0%}: " + "; ".join(f"{k} {v:.2f} ms" for k, v in res.items()), flush=True)
        p.grad = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
