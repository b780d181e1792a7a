"""The plots of launch.summarize: final validation loss against memory size (one line per placement), and the
training loss curves of all runs against tokens and against training FLOPs. matplotlib is imported here only."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from .summarize import PLOTS, Run


def _placement_label(run: Run) -> str:
    layers = run.placement()
    return "layers " + ",".join(map(str, layers)) if layers else "no memory"


def write_plots(runs: List[Run], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    # validation loss against memory size, one line per placement; dense runs as horizontal lines
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: Dict[str, List[Tuple[int, float]]] = {}
    for run in runs:
        loss = run.final_metrics().get("val/loss") if run.status == "finished" else None
        if loss is None:
            continue
        slots = run.memory_slots()
        if slots is None:
            ax.axhline(loss, linestyle="--", color="gray", label=f"{run.name} (no memory)")
        else:
            lines.setdefault(_placement_label(run), []).append((slots, loss))
    for label, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if lines:
        ax.set_xscale("log", base=2)
    else:
        ax.text(0.5, 0.5, "no finished run with a memory layer yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("memory slots (n_keys²)")
    ax.set_ylabel("final validation loss (nats/token)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    save(fig, PLOTS[0])

    # training loss curves against tokens and against training FLOPs
    for name, xlabel, per_token in ((PLOTS[1], "tokens", False), (PLOTS[2], "training FLOPs", True)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            train = run.train_records()
            fpt = run.flops_per_token() if per_token else 1
            if not train or fpt is None:
                continue
            label = run.name if run.status == "finished" else f"{run.name} ({run.status})"
            ax.plot([r["tokens"] * fpt for r in train], [r["loss"] for r in train], label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (nats/token)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no logged step yet", ha="center", va="center", transform=ax.transAxes)
        save(fig, name)
    return paths
