"""Profile training steps exactly as `python -m train` builds them (parallelize, optimizer, train_step), on
random tokens, and print the ops that take the most device time (rank 0). Works under torchrun.

    python scripts/profile_step.py config=configs/memory_373m.yaml train.batch_size=4 [--warmup 5 --steps 3]
    torchrun --nproc-per-node 2 scripts/profile_step.py config=... dist.memory_parallel=2
Flags (before or after the overrides): --warmup N, --steps N, --rows N, --trace DIR (a chrome trace per rank),
--no-profile (timing only).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from train.bench_steps import build_steps, time_steps  # noqa: E402
from train.config import parse_cli  # noqa: E402
from train.runtime import setup_runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--no-profile", action="store_true", help="time the steps only (no profiler pass)")
    args, overrides = ap.parse_known_args()
    cfg = parse_cli(overrides)
    rt = setup_runtime(cfg)
    setup = build_steps(cfg, rt, args.warmup + args.steps)
    step_s = time_steps(setup, args.warmup, args.steps)
    tokens = setup.tokens_per_step
    if rt.memory_comm is not None:
        rt.memory_comm.read_ms()
    if args.no_profile:
        if rt.is_main:
            print(f"step {step_s * 1e3:.1f} ms | {tokens / step_s:,.0f} tok/s per device")
            print_peak_memory(rt)
        rt.close()
        return

    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            setup.step()
        setup.sync()
    comm_ms = rt.memory_comm.read_ms() / args.steps if rt.memory_comm is not None else 0.0
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
        path = os.path.join(args.trace, f"rank{rt.rank}.json")
        prof.export_chrome_trace(path)
        from train.trace_summary import load_events, summarise

        # every rank: a late rank makes the others wait, so each one's view of the gaps differs
        print(f"--- rank {rt.rank} trace summary ({args.steps} steps)\n{summarise(load_events(path))}", flush=True)
    if rt.is_main:
        sort = "self_cuda_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
        print(f"step {step_s * 1e3:.1f} ms (unprofiled) | {tokens / step_s:,.0f} tok/s per device | "
              f"memory-layer collectives {comm_ms:.1f} ms/step (profiled steps)")
        print_peak_memory(rt)
    rt.close()


def print_peak_memory(rt) -> None:
    if rt.device.type == "cuda":
        stats = torch.cuda.memory_stats()
        print(f"peak allocated {stats['allocated_bytes.all.peak'] / 2**30:.1f} GiB | reserved "
              f"{stats['reserved_bytes.all.peak'] / 2**30:.1f} GiB | allocator retries {stats['num_alloc_retries']}")


if __name__ == "__main__":
    main()
