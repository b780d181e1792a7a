"""Save the value rows each memory layer reads in one training step, for kernel benchmarks on the trainer's own
rows (`scripts/bench_memory.py --slots FILE`). Uniform random rows, what the kernel benchmarks otherwise draw, spread
the pairs evenly; a training step's rows do not (some rows are read by thousands of pairs), and the lookup backward's
time depends on that spread.

    python scripts/capture_slots.py config=configs/memory_373m.yaml train.batch_size=4 data.seq_len=4096 \
        model.max_seq_len=4096 --warmup 8 --out slots.pt

The model and step are built as `python -m train` builds them (train/bench_steps.py: random tokens); the slots of the
last of warmup + 1 steps are saved as {"slots": {block index: int32 [tokens, heads * knn]}, "n_slots", "v_dim",
"overrides"}, and a line per layer says how concentrated its reads are.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from model.memory import value_parameters  # noqa: E402
from train.bench_steps import build_steps  # noqa: E402
from train.config import parse_cli  # noqa: E402
from train.memory_health import track_memory_usage  # noqa: E402
from train.runtime import setup_runtime  # noqa: E402


def concentration(slots: torch.Tensor, n_slots: int, top: int = 1000) -> str:
    """Rows read, the most pairs on one row, and the share of all pairs on the `top` busiest rows."""
    counts = torch.bincount(slots.reshape(-1).long(), minlength=n_slots)
    busiest = counts.sort(descending=True).values
    return (f"{int((counts > 0).sum())} of {n_slots} rows read, at most {int(busiest[0])} pairs on one row, "
            f"{float(busiest[:top].sum()) / max(slots.numel(), 1):.1%} of the pairs on the {top} busiest rows")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=8, help="steps before the captured one (the model moves a little)")
    ap.add_argument("--out", required=True, help="file to write (torch.save)")
    args, overrides = ap.parse_known_args()
    cfg = parse_cli(overrides)
    rt = setup_runtime(cfg)
    setup = build_steps(cfg, rt, args.warmup + 1)
    usage = track_memory_usage(setup.model)  # before the first step: compiled blocks then include the counting
    if not usage:
        raise SystemExit("capture_slots: the model has no memory layers (model.memory.layers)")
    for counter in usage.values():
        counter.keep_last = True
    for _ in range(args.warmup + 1):
        setup.step()
    setup.sync()
    slots = {layer: counter.last.to(torch.int32).cpu() for layer, counter in sorted(usage.items())}
    n_slots, v_dim = value_parameters(setup.model)[0].shape
    if rt.is_main:  # under torchrun: rank 0's tokens (every rank reads its own rows)
        torch.save(dict(slots=slots, n_slots=int(n_slots), v_dim=int(v_dim), overrides=overrides), args.out)
        for layer, s in slots.items():
            print(f"layer {layer}: {tuple(s.shape)} slots; {concentration(s, int(n_slots))}")
        print(f"wrote {args.out}")
    rt.close()


if __name__ == "__main__":
    main()
