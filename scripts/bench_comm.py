"""Collective bandwidth between the GPUs of this machine (what FSDP and the memory-parallel lookup get).

    torchrun --standalone --nproc-per-node 2 scripts/bench_comm.py [--sizes-mb 16 256 1024]
Prints, per collective and message size (the full tensor, bf16), the median time and the bus bandwidth
(nccl-tests' convention: all-reduce 2(n-1)/n, all-gather / reduce-scatter (n-1)/n of size per time).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def timed(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 256, 1024])
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if rank == 0:
        print(f"{n} x {torch.cuda.get_device_name()} | collective | MB | ms | bus GB/s")
    for mb in args.sizes_mb:
        numel = mb * 2**20 // 2 // n * n
        full = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
        part = full[: numel // n].clone()
        cases = {
            "all_reduce": (lambda: dist.all_reduce(full), 2 * (n - 1) / n),
            "all_gather": (lambda: dist.all_gather_into_tensor(full, part), (n - 1) / n),
            "reduce_scatter": (lambda: dist.reduce_scatter_tensor(part, full), (n - 1) / n),
        }
        for name, (fn, factor) in cases.items():
            t = timed(fn)
            if rank == 0:
                print(f"{name} | {mb} | {t * 1e3:.3f} | {factor * full.numel() * 2 / t / 1e9:.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
