"""The facts sweep's plots: QA exact match against memory size (one line per placement, dense runs as dashed
lines) and training loss against training FLOPs (one line per run).

    python scripts/facts_plots.py OUT          # OUT: a scripts/facts_sweep.py --out directory

Reads OUT/results.jsonl and OUT/runs/<run>/metrics.jsonl; writes OUT/em_vs_memory_size.png and
OUT/loss_vs_flops.png. matplotlib is imported here only.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

PANELS = (("qa_trained/em", "(a) people with trained QA"), ("qa_prose/em", "(b) people seen only in prose"))


def placement_lines(rows: List[dict]) -> Dict[str, List[Tuple[int, float, float]]]:
    """{label: [(memory values, EM (a), EM (b)), ...] sorted by size} for memory runs that report QA, grouped by
    data, model shape and placement; runs that change anything else (their name says what) stay out of the
    lines unless they are the only run of their size."""
    lines: Dict[str, Dict[int, Tuple[str, float, float]]] = defaultdict(dict)
    for r in rows:
        if not r.get("memory_values") or "qa_trained/em" not in r:
            continue
        label = (f"{r['data']} L{r['n_layers']} d{r['dim']}, memory at "
                 + ",".join(map(str, r["memory_layers"])))
        size = r["memory_values"]
        prev = lines[label].get(size)
        # of two runs with the same size and placement keep the one with the shorter name: the plain point,
        # not a settings variant (p10k_mem before p10k_mem_vlr1)
        if prev is None or len(r["run"]) < len(prev[0]):
            lines[label][size] = (r["run"], r["qa_trained/em"], r.get("qa_prose/em", float("nan")))
    return {k: sorted((s, a, b) for s, (_, a, b) in v.items()) for k, v in lines.items()}


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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, pts) in enumerate(sorted(placement_lines(rows).items())):
        for ax, j in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [p[j] for p in pts], "o-", color=colors[i % len(colors)], label=label)
    for i, r in enumerate(x for x in rows if not x.get("memory_values") and "qa_trained/em" in x):
        for ax, (key, _) in zip(axes, PANELS):
            ax.axhline(r.get(key, float("nan")), linestyle="--", color=colors[(i + 3) % len(colors)],
                       label=f"{r['run']} (dense)")
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

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        metrics = os.path.join(out, "runs", r["run"], "metrics.jsonl")
        if not os.path.exists(metrics) or "flops_per_token" not in r:
            continue
        xs, ys = loss_curve(metrics, r["flops_per_token"])
        if xs:
            ax.plot(xs, ys, linestyle="-" if r.get("memory_values") else "--", label=r["run"])
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (tokens x FLOPs per token, model/flops.py)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
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
