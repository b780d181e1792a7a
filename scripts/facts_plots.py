"""The facts sweep's plots: QA exact match against memory size (one line per placement, dense runs as dashed
lines; seeds averaged) and training loss against training FLOPs (one line per run).

    python scripts/facts_plots.py OUT          # OUT: a scripts/facts_sweep.py --out directory

Reads OUT/results.jsonl and every run's metrics.jsonl (its `metrics_file`, else OUT/runs/<run>/); writes
OUT/em_vs_memory_size.png and OUT/loss_vs_flops.png. matplotlib is imported here only.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

PANELS = (("qa_trained/em", "(a) people with trained QA"), ("qa_prose/em", "(b) people seen only in prose"))


def _mean(xs: List[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def placement_label(r: dict) -> str:
    where = ",".join(map(str, r["memory_layers"]))
    return (f"{r['data']} L{r['n_layers']} d{r['dim']}: memory {'beside' if r.get('keep_ffn') else 'in place of'} "
            f"the FFN of layer {where}")


def placement_lines(rows: List[dict]) -> Dict[str, List[Tuple[int, float, float]]]:
    """{label: [(memory values, EM (a), EM (b)), ...] sorted by size} for memory runs that report QA, grouped by
    data, model shape and placement (layers, beside or in place of the FFN); the runs of one group (its seeds)
    are averaged; groups that change anything else (their name says what) stay out of the lines unless they
    are the only group of their size."""
    points: Dict[str, Dict[int, Tuple[str, List[dict]]]] = defaultdict(dict)
    for r in rows:
        if not r.get("memory_values") or "qa_trained/em" not in r:
            continue
        label, size, group = placement_label(r), r["memory_values"], r.get("group") or r["run"]
        prev = points[label].get(size)
        # of two groups with the same size and placement keep the one with the shorter name: the plain point,
        # not a settings variant (p10k_mem before p10k_mem_vlr1)
        if prev is None or len(group) < len(prev[0]):
            points[label][size] = (group, [r])
        elif group == prev[0]:
            prev[1].append(r)
    return {label: sorted((size, _mean([r["qa_trained/em"] for r in rs]),
                           _mean([r.get("qa_prose/em", float("nan")) for r in rs]))
                          for size, (_, rs) in by_size.items())
            for label, by_size in points.items()}


def dense_levels(rows: List[dict]) -> Dict[str, Tuple[float, float, int]]:
    """{group: (EM (a), EM (b), runs)} of the dense runs that report QA, averaged over each group's seeds."""
    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        if not r.get("memory_values") and "qa_trained/em" in r:
            groups[r.get("group") or r["run"]].append(r)
    return {g: (_mean([r["qa_trained/em"] for r in rs]), _mean([r.get("qa_prose/em", float("nan")) for r in rs]),
                len(rs)) for g, rs in groups.items()}


def loss_curve(metrics_path: str, flops_per_token: float) -> Tuple[List[float], List[float]]:
    """(training FLOPs, training loss) at every logged step."""
    xs, ys = [], []
    with open(metrics_path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec and "tokens" in rec:
                xs.append(rec["tokens"] * flops_per_token)
                ys.append(rec["loss"])
    return xs, ys


def write_plots(out: str, rows: List[dict]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))  # (b) is far below (a): own scales
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, pts) in enumerate(sorted(placement_lines(rows).items())):
        for ax, j in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [p[j] for p in pts], "o-", color=colors[i % len(colors)], label=label)
    for i, (group, (a, b, n)) in enumerate(sorted(dense_levels(rows).items())):
        for ax, level in zip(axes, (a, b)):
            ax.axhline(level, linestyle="--", color=colors[(i + 3) % len(colors)],
                       label=f"{group}: no memory{f', mean of {n} seeds' if n > 1 else ''}")
    floors = {r["data"]: r for r in rows if "floor/qa_trained/em" in r}  # one per people set
    for data, r in sorted(floors.items()):
        for ax, (key, _) in zip(axes, PANELS):
            ax.axhline(r[f"floor/{key}"], linestyle=":", color="gray",
                       label=f"{data}: floor (always the most common answer)")
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory values (n_keys^2)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("QA exact match")
    axes[1].legend(fontsize=7, loc="best")
    path = os.path.join(out, "em_vs_memory_size.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    # Left: the whole run (log-log: the early fall spans decades). Right: the last 60% of training on linear axes,
    # smoothed over 5 logged steps, where memorising the facts separates the runs.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    group_color: Dict[str, str] = {}  # the seeds of a group share a color and one legend entry
    for r in rows:
        metrics = r.get("metrics_file") or os.path.join(out, "runs", r["run"], "metrics.jsonl")
        if not os.path.exists(metrics) or "flops_per_token" not in r:
            continue
        xs, ys = loss_curve(metrics, r["flops_per_token"])
        group = r.get("group") or r["run"]
        if not xs:
            continue
        first = group not in group_color
        color = group_color.setdefault(group, colors[len(group_color) % len(colors)])
        style = dict(linestyle="-" if r.get("memory_values") else "--", color=color, linewidth=1)
        axes[0].plot(xs, ys, label=group if first else None, **style)
        tail = [i for i, x in enumerate(xs) if x >= 0.4 * xs[-1]]
        smooth = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in tail]
        axes[1].plot([xs[i] for i in tail], smooth, **style)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_title("whole run")
    axes[1].set_title("last 60% of training (mean of 5 logged steps)")
    for ax in axes:
        ax.set_xlabel("training FLOPs (tokens x FLOPs per token, model/flops.py)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (facts + general text)")
    axes[0].legend(fontsize=6, ncol=2)
    path = os.path.join(out, "loss_vs_flops.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(os.path.join(argv[0], "results.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for path in write_plots(argv[0], rows):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
