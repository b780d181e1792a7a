"""Where did the GPU wait? Summarise a torch.profiler chrome trace (from scripts/profile_step.py --trace).

For the profiled window it prints:
- GPU busy time (union over streams), split into NCCL kernels and the rest ("compute");
- the idle gaps of the compute kernels, split by what ended each gap: the next kernel was launched only just
  before it ran (the host was late: CPU-bound), or long before (it waited on another stream: a collective, an
  event, a copy);
- for host-late gaps, the host-side ranges (FSDP hooks, optimizer, autograd, ...) that were running;
- CUDA runtime calls by total time (synchronisations show up here).

Its command line is scripts/trace_summary.py.
"""
from __future__ import annotations

import bisect
import gzip
import json
from collections import Counter, defaultdict
from typing import Dict, List, Tuple


def load_events(path: str) -> List[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def union_length(intervals: List[Tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def merged(intervals: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[List[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def summarise(events: List[dict], top: int = 12, late_us: float = 30.0) -> str:
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return "no GPU events in this trace"
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launch_ts: Dict[int, float] = {}
    for e in runtime:
        corr = e.get("args", {}).get("correlation")
        if corr is not None:
            launch_ts[corr] = e["ts"]
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    window = t1 - t0
    is_nccl = lambda e: "nccl" in e["name"].lower()  # noqa: E731
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in gpu if is_nccl(e)]
    compute_events = sorted((e for e in gpu if not is_nccl(e)), key=lambda e: e["ts"])
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in compute_events]
    lines = [
        f"window {window / 1e3:.1f} ms | GPU busy (any stream) {union_length(nccl + compute) / 1e3:.1f} ms | "
        f"compute kernels {union_length(compute) / 1e3:.1f} ms | NCCL kernels {union_length(nccl) / 1e3:.1f} ms "
        f"({len(nccl)} launches)"
    ]

    # Gaps between compute kernels, attributed to what made the next kernel late.
    starts = [e["ts"] for e in compute_events]
    late_total, wait_total, late_gaps, wait_gaps = 0.0, 0.0, [], []
    busy = merged(compute)
    for (a0, a1), (b0, _) in zip(busy, busy[1:]):
        gap = b0 - a1
        if gap < 5:
            continue
        nxt = compute_events[bisect.bisect_left(starts, b0)]
        launched = launch_ts.get(nxt.get("args", {}).get("correlation"))
        if launched is not None and launched > b0 - late_us:
            late_total += gap
            late_gaps.append((a1, b0))
        else:
            wait_total += gap
            wait_gaps.append((gap, a1, nxt["name"][:70]))
    lines.append(
        f"compute idle {(window - union_length(compute)) / 1e3:.1f} ms: host late (next kernel launched < {late_us:.0f} us "
        f"before it ran) {late_total / 1e3:.1f} ms in {len(late_gaps)} gaps | waiting on a dependency "
        f"{wait_total / 1e3:.1f} ms in {len(wait_gaps)} gaps"
    )

    # Host ranges overlapping the host-late gaps: which Python-level work the GPU was waiting for.
    host = [e for e in events if e.get("cat") in ("user_annotation", "cpu_op", "python_function")]
    by_name: Dict[str, float] = defaultdict(float)
    for e in host:
        a, b = e["ts"], e["ts"] + e["dur"]
        lo = bisect.bisect_left(late_gaps, (a - 1e12, 0))
        overlap = 0.0
        for g0, g1 in late_gaps[lo:]:
            if g0 >= b:
                break
            overlap += max(0.0, min(b, g1) - max(a, g0))
        if overlap > 0:
            by_name[e["name"][:80]] += overlap
    if by_name:
        lines.append("host ranges during host-late gaps (ms; nested ranges each count):")
        for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {t / 1e3:8.2f}  {name}")
    if wait_gaps:
        lines.append("longest dependency waits (ms, kernel that ended the wait):")
        for gap, _, name in sorted(wait_gaps, reverse=True)[: top // 2]:
            lines.append(f"  {gap / 1e3:8.2f}  {name}")

    calls: Counter = Counter()
    counts: Counter = Counter()
    for e in runtime:
        calls[e["name"]] += e["dur"]
        counts[e["name"]] += 1
    lines.append("CUDA runtime calls by total time (ms, count):")
    for name, t in calls.most_common(top // 2):
        lines.append(f"  {t / 1e3:8.2f}  {counts[name]:6d}  {name}")
    return "\n".join(lines)
