"""One table and a few plots for a set of runs (a sweep's points, or any run directories).

    python -m launch.summarize RUN_DIR... [out=DIR]

A RUN_DIR is a run directory (it holds config.yaml or metrics.jsonl) or a folder of them (a sweep's). Writes to
`out` (default: the folder the runs share):
  summary.csv, summary.md      one row per run: the config keys that differ between runs, its status, final
                               validation loss/bpb per source, QA metrics, tokens, tokens/s, MFU, peak memory,
                               parameters, FLOPs per token, training FLOPs
  val_loss_vs_memory_size.png  final validation loss against memory slots (n_keys^2), one line per placement
  loss_vs_tokens.png           training loss curves of every run against tokens seen
  loss_vs_flops.png            the same against training FLOPs (tokens x FLOPs per token)
Unfinished runs are shown as such ("stopped at step k/N", "not started") with whatever they logged so far.
matplotlib is imported only to draw; without it the tables are still written.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

SUMMARY_FILE = "summary.json"  # written by the trainer when a run finishes (train/metrics.py)
# Keys that differ between every pair of runs by construction: not a difference worth a column.
_NOT_A_DIFFERENCE = ("run_dir", "logging.group", "logging.run_name")
PLOTS = ("val_loss_vs_memory_size.png", "loss_vs_tokens.png", "loss_vs_flops.png")


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def last_checkpoint_step(run_dir: str) -> Optional[int]:
    from model.checkpoint import list_checkpoints  # the trainer's own notion of a complete checkpoint

    found = list_checkpoints(run_dir)
    return int(os.path.basename(found[-1]).split("_")[1]) if found else None


def run_status(run_dir: str, steps: int) -> Tuple[str, Optional[int]]:
    """("finished" | "resumable" | "new", step): finished once the trainer wrote its summary at `steps`."""
    summary = _read_json(os.path.join(run_dir, SUMMARY_FILE))
    if summary is not None and summary.get("step", -1) >= steps:
        return "finished", summary["step"]
    step = last_checkpoint_step(run_dir)
    return ("resumable", step) if step is not None else ("new", None)


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


@dataclass
class Run:
    name: str
    run_dir: str
    config: Dict[str, Any] = field(default_factory=dict)  # flat dotted keys
    records: List[Dict[str, Any]] = field(default_factory=list)
    summary: Optional[Dict[str, Any]] = None

    @property
    def steps(self) -> Optional[int]:
        return self.config.get("train.steps")

    @property
    def status(self) -> str:
        if self.summary is not None and self.steps is not None and self.summary.get("step", -1) >= self.steps:
            return "finished"
        logged = [r["step"] for r in self.records if "loss" in r]
        if not logged and not os.path.exists(os.path.join(self.run_dir, "config.yaml")):
            return "not started"
        return f"stopped at step {max(logged, default=0)}/{self.steps}"

    def train_records(self) -> List[Dict[str, Any]]:
        return [r for r in self.records if "loss" in r and "tokens" in r]

    def flops_per_token(self) -> Optional[int]:
        for r in self.records:
            if "flops_per_token" in r:
                return r["flops_per_token"]
        return (self.summary or {}).get("flops_per_token")

    def final_metrics(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        vals = [r for r in self.records if "val/loss" in r]
        if vals:
            out.update({k: v for k, v in vals[-1].items() if k.startswith("val/")})
        for r in self.records:  # QA tasks: the latest value of each metric
            out.update({k: v for k, v in r.items() if k.startswith("eval/")})
        train = self.train_records()
        if train:
            out["step"] = train[-1]["step"]
            out["tokens"] = train[-1]["tokens"]
            # The first logged step of each start includes warm-up (compilation, caches): left out of speeds.
            steady = [r for r in train[1:] if r["step"] > train[0]["step"]] or train
            for key in ("tokens_per_s", "mfu"):
                if any(key in r for r in steady):
                    out[key] = statistics.median(r[key] for r in steady if key in r)
            peaks = [r["peak_mem_gib"] for r in train if "peak_mem_gib" in r]
            if peaks:
                out["peak_mem_gib"] = max(peaks)
        for r in self.records:
            if "params" in r:
                out["params"] = r["params"]
        fpt = self.flops_per_token()
        if fpt is not None:
            out["flops_per_token"] = fpt
            if "tokens" in out:
                out["train_flops"] = out["tokens"] * fpt
        return out

    def memory_slots(self) -> Optional[int]:
        if not self.placement():
            return None
        n_keys = self.config.get("model.memory.n_keys")
        return n_keys * n_keys if n_keys else None

    def placement(self) -> List[int]:
        """The blocks that hold a memory layer (model.memory.layers, or every/start)."""
        every = self.config.get("model.memory.every")
        if every:
            return list(range(self.config.get("model.memory.start", 0), self.config.get("model.n_layers", 0), every))
        return sorted(self.config.get("model.memory.layers") or [])


def load_run(run_dir: str, name: Optional[str] = None, planned: Optional[Dict[str, Any]] = None) -> Run:
    """A run's config, metrics and summary; `planned` (dotted keys) stands in for the config of a point that has
    not started."""
    run = Run(name=name or os.path.basename(os.path.normpath(run_dir)), run_dir=run_dir)
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(cfg_path):
        run.config = flatten(OmegaConf.to_container(OmegaConf.load(cfg_path)))
    elif planned:
        run.config = dict(planned)
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    run.records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write
    run.summary = _read_json(os.path.join(run_dir, SUMMARY_FILE))
    return run


def is_run_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("config.yaml", "metrics.jsonl"))


def find_runs(paths: List[str]) -> List[str]:
    """Run directories among `paths`, a folder of runs standing for its run directories (sorted)."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise SystemExit(f"summarize: {path}: no such directory")
        if is_run_dir(path):
            found.append(path)
            continue
        inner = sorted(os.path.join(path, d) for d in os.listdir(path) if is_run_dir(os.path.join(path, d)))
        if not inner:
            raise SystemExit(f"summarize: {path}: neither a run directory (config.yaml, metrics.jsonl) nor a folder of them")
        found += inner
    return found


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int) and abs(value) >= 10**7:  # parameters, FLOPs: 1.400e+09 reads better
        return f"{value:.3e}"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)


def differing_keys(runs: List[Run]) -> List[str]:
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    out = []
    for key in keys:
        if key in _NOT_A_DIFFERENCE:
            continue
        seen = {json.dumps(r.config.get(key), sort_keys=True) for r in runs if r.config}
        if len(seen) > 1:
            out.append(key)
    return out


_METRIC_ORDER = ("val/loss", "val/bpb")
_TAIL = ("step", "tokens", "tokens_per_s", "mfu", "peak_mem_gib", "params", "flops_per_token", "train_flops")


def table(runs: List[Run]) -> Tuple[List[str], List[List[Any]]]:
    diffs = differing_keys(runs)
    metrics = [r.final_metrics() for r in runs]
    present = set().union(*[m.keys() for m in metrics]) if metrics else set()
    val_keys = [k for k in _METRIC_ORDER if k in present]
    val_keys += sorted(k for k in present if k.startswith("val/") and k not in val_keys)
    eval_keys = sorted(k for k in present if k.startswith("eval/"))
    tail = [k for k in _TAIL if k in present]
    header = ["point", "status"] + diffs + val_keys + eval_keys + tail
    rows = []
    for run, m in zip(runs, metrics):
        rows.append([run.name, run.status] + [run.config.get(k) for k in diffs] + [m.get(k) for k in header[2 + len(diffs):]])
    return header, rows


def best_run(runs: List[Run]) -> Optional[Tuple[Run, float]]:
    done = [(r, r.final_metrics().get("val/loss")) for r in runs if r.status == "finished"]
    done = [(r, v) for r, v in done if v is not None]
    return min(done, key=lambda rv: rv[1]) if done else None


def markdown(header: List[str], rows: List[List[Any]]) -> str:
    def cell(v):
        return _text(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(runs: List[Run], out_dir: str) -> str:
    header, rows = table(runs)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[json.dumps(v) if isinstance(v, list) else v for v in row] for row in rows])
    text = markdown(header, rows)
    best = best_run(runs)
    if best is not None:
        text += f"\nLowest final validation loss: **{best[0].name}** ({best[1]:.4f}).\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    return text


def summarize(runs: List[Run], out_dir: str) -> str:
    """Write the tables and plots of `runs` into out_dir; returns the Markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    text = write_tables(runs, out_dir)
    try:
        from .summary_plots import write_plots

        write_plots(runs, out_dir)
    except ImportError:
        text += "\n(no plots: matplotlib is not installed; pip install matplotlib)\n"
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    out = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    paths = [a for a in argv if not a.startswith("out=")]
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    run_dirs = find_runs(paths)
    if out:
        out_dir = out[-1]
    elif len(paths) == 1:  # a sweep's folder, or a single run
        out_dir = paths[0]
    else:
        out_dir = os.path.commonpath([os.path.abspath(os.path.dirname(os.path.normpath(d))) for d in run_dirs])
    print(summarize([load_run(d) for d in run_dirs], out_dir), end="")
    print(f"wrote {out_dir}/summary.csv, summary.md, {', '.join(PLOTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
