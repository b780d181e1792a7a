"""Compare training runs from their metrics.jsonl: throughput per device against the first run, memory-layer
collective time, and loss parity (mean loss over the last logged steps, and the largest gap at any logged step).

    python scripts/compare_runs.py RUN_DIR [RUN_DIR ...] [--skip 10] [--tail 20]
"""
from __future__ import annotations

import argparse
import json
import os


def records(run_dir: str):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--skip", type=int, default=10, help="steps excluded from throughput (warm-up, compile)")
    ap.add_argument("--tail", type=int, default=20, help="steps over which the final loss is averaged")
    args = ap.parse_args()
    base_tps, base_loss = None, None
    print("run | tok/s/device | vs first | memory comm ms/step (share) | loss, last steps | max |Δloss| vs first")
    for run in args.runs:
        recs = [r for r in records(run) if "tokens_per_s_per_device" in r]
        if not recs:
            print(f"{os.path.basename(run)} | no metrics")
            continue
        last = recs[-1]["step"]
        timed = [r for r in recs if r["step"] > args.skip] or recs
        tps = sum(r["tokens_per_s_per_device"] for r in timed) / len(timed)
        comm = [r["memory_comm_ms"] for r in timed if "memory_comm_ms" in r]
        frac = [r["memory_comm_frac"] for r in timed if "memory_comm_frac" in r]
        tail = [r["loss"] for r in recs if r["step"] > last - args.tail]
        loss = {r["step"]: r["loss"] for r in recs}
        base_tps = base_tps or tps
        base_loss = base_loss or loss
        common = sorted(set(loss) & set(base_loss))
        gap = max(abs(loss[s] - base_loss[s]) for s in common) if common else float("nan")
        comm_s = f"{sum(comm) / len(comm):.1f} ({sum(frac) / len(frac):.1%})" if comm else "–"
        print(f"{os.path.basename(run)} | {tps:,.0f} | {tps / base_tps:.1%} | {comm_s} | "
              f"{sum(tail) / len(tail):.4f} | {gap:.4f}")


if __name__ == "__main__":
    main()
