"""Many facts-experiment runs at once on one machine: small models leave a GPU mostly idle, so a grid of them
(dense vs Memory+ over people x model size x memory size x memory settings) runs concurrently, under one
wall-clock budget, and ends with one table.

    python scripts/facts_sweep.py --sweep configs/sweeps/facts_gpu.yaml --out OUT [--work DIR] \
        [--parallel 8] [--budget-s 420] [key=value ...]

The sweep file (configs/sweeps/facts_*.yaml):
    config: configs/facts_small.yaml        # every run starts from it
    overrides: [train.device=cuda, ...]     # every run
    datasets:                               # synthetic people, generated and pretokenized once, up front
      p5k: {entities: 5000, facts_share: 0.85, docs_per_entity: 4, qa_fraction: 0.5, seed: 0}
    runs:
      - {name: p5k_mem, data: p5k, overrides: [model.memory.n_keys=256]}
      - {name: p5k_dense, data: p5k, dense_of: p5k_mem}   # no memory, FFN widened to at least p5k_mem's FLOPs
      - {name: mem, data: p5k, seeds: [0, 1, 2]}          # runs mem_s0, mem_s1, mem_s2 (train/data.seed 0, 1, 2)
      - {name: dense, data: p5k, dense_of: mem, seeds: [0, 1, 2]}  # dense_s0 twin of mem_s0, ...

Each run is `python -m train` in its own directory under --work (data there too); --out gets the small files
back: results.jsonl (one line per run: the last QA evaluation and validation loss it reached, FLOPs per token,
steps, throughput), results.md (the table, also printed; runs with `seeds` also get their mean and spread over
seeds), the plots, and every run's metrics.jsonl, summary.json and log tail under
OUT/runs/ (not with --no-run-files: they stay in --work). Runs still going at --budget-s get SIGTERM (the trainer
stops at its next step) and then SIGKILL; their rows show how far they got (periodic QA evaluation: eval.every).
Trailing key=value arguments override every run (after the sweep file's), e.g. train.steps=20 train.device=cpu
for a dry run of the command.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.config import resolve_path  # noqa: E402
from data.pretokenize import pretokenize  # noqa: E402
from eval.synthetic_facts import generate  # noqa: E402
from model.flops import flops_per_token  # noqa: E402
from scripts.facts_experiment import GENERAL_TRAIN, GENERAL_VAL, matched_dense  # noqa: E402
from train.config import load_config  # noqa: E402

TASKS = ("qa_trained", "qa_prose")
_DATASET_KEYS = {"entities", "facts_share", "docs_per_entity", "qa_fraction", "seed"}
_RUN_KEYS = {"name", "data", "overrides", "dense_of", "seeds"}


class SweepFileError(ValueError):
    pass


def load_sweep(path: str) -> dict:
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    bad = set(spec) - {"config", "overrides", "datasets", "runs"}
    if bad:
        raise SweepFileError(f"{path}: unknown keys {sorted(bad)}")
    spec.setdefault("config", "configs/facts_small.yaml")
    spec.setdefault("overrides", [])
    datasets, runs = spec.get("datasets") or {}, spec.get("runs") or []
    if not datasets or not runs:
        raise SweepFileError(f"{path}: needs `datasets` and `runs`")
    for name, d in datasets.items():
        if set(d) - _DATASET_KEYS or "entities" not in d:
            raise SweepFileError(f"{path}: datasets.{name}: needs `entities`; allowed keys {sorted(_DATASET_KEYS)}")
    seeds_of: Dict[str, list] = {}
    for i, r in enumerate(runs):
        where = f"{path}: runs[{i}]"
        if set(r) - _RUN_KEYS or "name" not in r or "data" not in r:
            raise SweepFileError(f"{where}: needs `name` and `data`; allowed keys {sorted(_RUN_KEYS)}")
        if r["name"] in seeds_of:
            raise SweepFileError(f"{where}: name {r['name']!r} used twice")
        if r["data"] not in datasets:
            raise SweepFileError(f"{where}: data {r['data']!r} is not one of {sorted(datasets)}")
        seeds = r.get("seeds")
        if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                                  or not all(isinstance(x, int) and x >= 0 for x in seeds)):
            raise SweepFileError(f"{where}: seeds must be a non-empty list of distinct ints >= 0, got {seeds!r}")
        twin = r.get("dense_of")
        if twin is not None and twin not in seeds_of:
            raise SweepFileError(f"{where}: dense_of {twin!r} must name a run listed before it")
        if twin is not None and seeds_of[twin] is not None and seeds_of[twin] != seeds:
            raise SweepFileError(f"{where}: dense_of {twin!r} runs seeds {seeds_of[twin]}: list the same seeds "
                                 f"(each seed's twin), got {seeds!r}")
        seeds_of[r["name"]] = seeds
    spec["runs"] = expand_seeds(runs, seeds_of)
    names = [r["name"] for r in spec["runs"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SweepFileError(f"{path}: run names {twice} used twice (after expanding seeds)")
    return spec


def expand_seeds(runs: List[dict], seeds_of: Dict[str, list]) -> List[dict]:
    """A run with `seeds: [a, b]` becomes runs NAME_sa, NAME_sb of group NAME, with train.seed and data.seed a, b
    (other initial weights and another order of the documents); the dense twin of
    a seeded run is the twin of the same seed. Runs without seeds keep their name (and their group is it)."""
    out = []
    for r in runs:
        base = {k: v for k, v in r.items() if k != "seeds"}
        if r.get("seeds") is None:
            out.append({**base, "group": r["name"]})
            continue
        for seed in r["seeds"]:
            run = {**base, "name": f"{r['name']}_s{seed}", "group": r["name"],
                   "overrides": list(r.get("overrides") or []) + [f"train.seed={seed}", f"data.seed={seed}"]}
            if r.get("dense_of") is not None and seeds_of[r["dense_of"]] is not None:
                run["dense_of"] = f"{r['dense_of']}_s{seed}"
            out.append(run)
    return out


def prepare_data(name: str, d: dict, work: str, tokenizer_spec: str, general_shards: str, workers: int = 1) -> List[str]:
    """Generate and pretokenize one dataset; return its data and eval overrides (per-document weights give the
    facts `facts_share` of the training tokens)."""
    out = os.path.join(work, "data", name)
    generate(out, d["entities"], d.get("seed", 0), d.get("docs_per_entity", 4), d.get("qa_fraction", 0.5))
    shards = os.path.join(out, "train_tokens")
    facts = pretokenize([os.path.join(out, "train.jsonl")], tokenizer_spec, shards, workers=workers)
    general = json.load(open(os.path.join(general_shards, "index.json")))
    share = d.get("facts_share", 0.8)
    # +2: the BOS and EOS the loader adds to every document
    w_facts = share / (facts["n_tokens"] / facts["docs"] + 2)
    w_general = (1 - share) / (general["n_tokens"] / general["docs"] + 2)
    scale = 1.0 / min(w_facts, w_general)
    tasks = ",".join(f"jsonl:{os.path.join(out, t)}.jsonl" for t in TASKS)
    print(f"data {name}: {d['entities']} people, {facts['docs']} documents, {facts['n_tokens']} tokens", flush=True)
    return [f"data.train=[{{paths: [{shards}], weight: {w_facts * scale:.4f}}}, "
            f"{{paths: [{general_shards}], weight: {w_general * scale:.4f}}}]",
            f"data.val=[{{paths: [{resolve_path(GENERAL_VAL)}]}}]", f"eval.tasks=[{tasks}]"]


def guess_em(qa_path: str, n: int) -> float:
    """Exact match of always answering an attribute's most common value (over the whole file) on the first n
    questions (n = eval.max_examples; 0: all): the floor a model that learned no per-person fact reaches."""
    with open(qa_path) as f:
        rows = [json.loads(line) for line in f]
    counts: Dict[str, Dict[str, int]] = {}
    for r in rows:
        c = counts.setdefault(r["attribute"], {})
        c[r["answers"][0]] = c.get(r["answers"][0], 0) + 1
    best = {a: max(c, key=c.get) for a, c in counts.items()}
    asked = rows[:n] if n else rows
    return sum(r["answers"][0] == best[r["attribute"]] for r in asked) / len(asked)


def plan(spec: dict, work: str, extra: List[str]) -> Dict[str, List[str]]:
    """Every run's full override list (validated: a bad key fails here, before anything trains)."""
    base = load_config(spec["config"], spec["overrides"] + extra)
    os.makedirs(work, exist_ok=True)
    general_shards = os.path.join(work, "data", "general_tokens")
    pretokenize([resolve_path(GENERAL_TRAIN)], base.data.tokenizer, general_shards, workers=min(4, os.cpu_count() or 1))
    names = list(spec["datasets"])
    cpus = os.cpu_count() or 1
    workers = max(1, min(4, cpus // len(names) - 1))  # tokenizer processes per dataset
    with ProcessPoolExecutor(max_workers=min(len(names), cpus)) as pool:  # one process per dataset
        made = pool.map(prepare_data, names, [spec["datasets"][n] for n in names], [work] * len(names),
                        [base.data.tokenizer] * len(names), [general_shards] * len(names), [workers] * len(names))
        data_ov = dict(zip(names, made))
    own: Dict[str, List[str]] = {}  # each run's overrides before `extra` and its run_dir
    runs: Dict[str, List[str]] = {}
    for r in spec["runs"]:
        if r.get("dense_of"):
            ov = own[r["dense_of"]] + list(r.get("overrides") or [])
            ov += matched_dense(load_config(spec["config"], ov + extra))
        else:
            ov = spec["overrides"] + data_ov[r["data"]] + list(r.get("overrides") or [])
        own[r["name"]] = ov
        runs[r["name"]] = ov + extra + [f"run_dir={os.path.join(work, 'runs', r['name'])}"]
        load_config(spec["config"], runs[r["name"]])
    return runs


def read_run(run_dir: str) -> dict:
    """What a run reached: its last validation loss and QA evaluation, steps, throughput, memory health."""
    out: dict = {"step": 0}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    tps = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by SIGKILL
                continue
            out["step"] = max(out["step"], rec.get("step", 0))
            for key in ("flops_per_token", "params"):
                if key in rec:
                    out[key] = rec[key]
            if "val/loss" in rec:
                out["val_loss"] = rec["val/loss"]
            if "tokens_per_s" in rec:
                tps.append(rec["tokens_per_s"])
            if any(k.startswith("eval/") and k.endswith("/em") for k in rec):
                out["eval_step"] = rec["step"]
                out.setdefault("evals", []).append(
                    {"step": rec["step"], **{t: rec.get(f"eval/{t}/em") for t in TASKS}})
                for t in TASKS:
                    for m in ("em", "answer_nll"):
                        if f"eval/{t}/{m}" in rec:
                            out[f"{t}/{m}"] = rec[f"eval/{t}/{m}"]
            for k, v in rec.items():
                if k.startswith("memory/"):
                    out[k] = v
    if tps:
        out["tokens_per_s"] = tps[-1]
    out["finished"] = os.path.exists(os.path.join(run_dir, "summary.json"))
    return out


def launch(name: str, config: str, overrides: List[str], run_dir: str, threads: int) -> subprocess.Popen:
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled")
    log = open(os.path.join(run_dir, "log.txt"), "w")
    cmd = [sys.executable, "-m", "train", f"config={config}", *overrides]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # its own session: the run and its data workers are stopped together, and nothing else
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    print(f"start {name}", flush=True)
    return proc


def stop(procs: Dict[str, subprocess.Popen], grace_s: float = 30.0) -> None:
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    end = time.time() + grace_s
    while time.time() < end and any(p.poll() is None for p in procs.values()):
        time.sleep(0.5)
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_all(runs: Dict[str, List[str]], config: str, work: str, parallel: int, budget_s: float,
            threads: int, grace_s: float = 30.0) -> Dict[str, int]:
    """Run everything, `parallel` at a time; returns each run's exit code (None: stopped at the budget)."""
    deadline = time.time() + budget_s
    queue, live, codes = list(runs), {}, {}
    while queue or live:
        while queue and len(live) < parallel and time.time() < deadline:
            name = queue.pop(0)
            live[name] = launch(name, config, runs[name], os.path.join(work, "runs", name), threads)
        for name, p in list(live.items()):
            if p.poll() is not None:
                codes[name] = p.returncode
                p.log.close()
                del live[name]
                print(f"done {name}: exit {p.returncode}", flush=True)
        if time.time() >= deadline:
            if live:
                print(f"budget reached: stopping {', '.join(live)}", flush=True)
            stop(live, grace_s)
            for name, p in live.items():
                codes[name] = None
                p.log.close()
            for name in queue:
                codes[name] = "not started"
            break
        time.sleep(1.0)
    return codes


def table(rows: List[dict]) -> str:
    def f(r, k, fmt):
        return format(r[k], fmt) if k in r else "-"

    lines = ["| run | FLOPs/token | step | (a) trained QA EM | (b) prose-only EM | (a) NLL | (b) NLL | general val NLL | "
             "tok/s | exit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = f"{r['flops_per_token'] / 1e6:.3f}M" if "flops_per_token" in r else "-"
        step = f"{r['step']}" + (f" (eval {r['eval_step']})" if r.get("eval_step", r["step"]) != r["step"] else "")
        lines.append(f"| {r['run']} | {flops} | {step} | {f(r, 'qa_trained/em', '.3f')} | {f(r, 'qa_prose/em', '.3f')} | "
                     f"{f(r, 'qa_trained/answer_nll', '.2f')} | {f(r, 'qa_prose/answer_nll', '.2f')} | "
                     f"{f(r, 'val_loss', '.4f')} | {f(r, 'tokens_per_s', '.0f')} | {r['exit']} |")
    return "\n".join(lines)


def seed_groups(rows: List[dict]) -> List[dict]:
    """Mean and spread over seeds of every group of more than one run (a sweep run with `seeds`)."""
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group") or r["run"], []).append(r)
    out = []
    for name, members in groups.items():
        if len(members) < 2:
            continue
        g = {"group": name, "runs": [r["run"] for r in members], "flops_per_token": members[0].get("flops_per_token")}
        for key in ("qa_trained/em", "qa_prose/em", "val_loss"):
            vals = [r[key] for r in members if key in r]
            if vals:
                mean = sum(vals) / len(vals)
                std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
                g[key] = {"n": len(vals), "mean": mean, "std": std, "min": min(vals), "max": max(vals)}
        out.append(g)
    return out


def seed_table(groups: List[dict]) -> str:
    def f(g, k, fmt):
        if k not in g:
            return "-"
        s = g[k]
        return f"{s['mean']:{fmt}} ± {s['std']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}}, n={s['n']})"

    lines = ["| runs (over seeds) | FLOPs/token | (a) trained QA EM | (b) prose-only EM | general val NLL |",
             "|---|---|---|---|---|"]
    for g in groups:
        flops = f"{g['flops_per_token'] / 1e6:.3f}M" if g.get("flops_per_token") else "-"
        lines.append(f"| {g['group']} | {flops} | {f(g, 'qa_trained/em', '.3f')} | {f(g, 'qa_prose/em', '.3f')} | "
                     f"{f(g, 'val_loss', '.4f')} |")
    return "mean ± standard deviation (min–max, runs) over seeds:\n\n" + "\n".join(lines)


def collect(runs: Dict[str, List[str]], codes: Dict[str, int], work: str, out: str, config: str,
            info: Dict[str, dict], run_files: Optional[str] = None) -> List[dict]:
    """Read every run, write OUT/results.jsonl and OUT/results.md.

    run_files: where each run's metrics.jsonl, summary.json and log tail are copied (RUN_FILES/<run>/);
    None: not copied (the rows point at the metrics in the run directories)."""
    rows = []
    for name, ov in runs.items():
        run_dir = os.path.join(work, "runs", name)
        res = read_run(run_dir)
        cfg = load_config(config, ov)
        if "flops_per_token" not in res:
            res["flops_per_token"] = flops_per_token(cfg.model, cfg.data.seq_len).total
        layers = cfg.model.memory.resolved_layers(cfg.model.n_layers)
        shape = {"data": info.get(name, {}).get("data"), "group": info.get(name, {}).get("group", name),
                 "dim": cfg.model.dim, "n_layers": cfg.model.n_layers, "memory_layers": layers,
                 "memory_values": cfg.model.memory.n_keys ** 2 if layers else 0,
                 "keep_ffn": bool(layers) and cfg.model.memory.keep_ffn, "seed": cfg.train.seed}
        metrics_file = os.path.join(run_dir, "metrics.jsonl")
        if run_files is not None:
            dst = os.path.join(run_files, name)
            os.makedirs(dst, exist_ok=True)
            for fname in ("metrics.jsonl", "summary.json"):
                if os.path.exists(os.path.join(run_dir, fname)):
                    shutil.copy(os.path.join(run_dir, fname), dst)
            metrics_file = os.path.join(dst, "metrics.jsonl")
            log = os.path.join(run_dir, "log.txt")
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    tail = f.readlines()[-60:]
                with open(os.path.join(dst, "log_tail.txt"), "w") as f:
                    f.writelines(tail)
        rows.append({"run": name, "exit": codes.get(name), **shape, **res, "metrics_file": metrics_file,
                     "overrides": ov})
    n = load_config(config, next(iter(runs.values()))).eval.max_examples
    floors = {name: {t: guess_em(os.path.join(work, "data", name, t + ".jsonl"), n) for t in TASKS}
              for name in sorted({r["data"] for r in rows if r.get("data")})}
    for r in rows:
        r.update({f"floor/{t}/em": v for t, v in floors.get(r.get("data"), {}).items()})
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    md = table(rows)
    groups = seed_groups(rows)
    if groups:
        md += "\n\n" + seed_table(groups)
    for name, floor in floors.items():
        md += (f"\n\n{name}: answering every question with its attribute's most common value scores "
               + ", ".join(f"{t} {floor[t]:.3f}" for t in TASKS) + " (no per-person fact learned)")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", required=True, help="a facts sweep file (configs/sweeps/facts_*.yaml)")
    p.add_argument("--out", required=True, help="small results: tables and every run's metrics")
    p.add_argument("--work", default=None, help="data and run directories (default: --out)")
    p.add_argument("--parallel", type=int, default=8, help="runs at once")
    p.add_argument("--budget-s", type=float, default=420, help="wall-clock seconds for all runs (after data)")
    p.add_argument("--total-s", type=float, default=None,
                   help="wall-clock seconds for the whole command: the runs' budget is what data preparation, "
                        "the stop grace and the table leave of it (at most --budget-s)")
    p.add_argument("--stop-grace-s", type=float, default=30, help="seconds between SIGTERM and SIGKILL at the budget")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (OMP_NUM_THREADS)")
    p.add_argument("--no-run-files", action="store_true",
                   help="do not copy each run's metrics and log tail to OUT/runs/ (they stay in --work): OUT "
                        "then holds only the tables and plots")
    p.add_argument("--only", default="", help="comma-separated run names: run just these")
    p.add_argument("--entities-scale", type=float, default=1.0,
                   help="multiply every dataset's people count (a small-scale dry run of a sweep file)")
    args, extra = p.parse_known_args(argv)
    try:
        spec = load_sweep(args.sweep)
    except SweepFileError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    for d in spec["datasets"].values():
        d["entities"] = max(4, round(d["entities"] * args.entities_scale))
    work = os.path.abspath(args.work or args.out)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    runs = plan(spec, work, extra)
    if args.only:
        keep = args.only.split(",")
        unknown = set(keep) - set(runs)
        if unknown:
            print(f"--only: unknown runs {sorted(unknown)}; known: {', '.join(runs)}", file=sys.stderr)
            return 2
        runs = {n: ov for n, ov in runs.items() if n in keep}
    print(f"data and configs ready in {time.time() - t0:.0f}s; {len(runs)} runs, {args.parallel} at once", flush=True)
    budget = args.budget_s
    if args.total_s is not None:  # 15 s for the table and plots
        budget = min(budget, args.total_s - (time.time() - t0) - args.stop_grace_s - 15)
    print(f"runs budget {budget:.0f}s", flush=True)
    codes = run_all(runs, spec["config"], work, args.parallel, budget, args.threads, args.stop_grace_s)
    run_files = None if args.no_run_files else os.path.join(out, "runs")
    rows = collect(runs, codes, work, out, spec["config"], {r["name"]: r for r in spec["runs"]}, run_files)
    try:
        from scripts.facts_plots import write_plots

        for path in write_plots(out, rows):
            print(f"wrote {path}")
    except ImportError as e:  # matplotlib is optional: the tables are the result
        print(f"no plots: {e}")
    print(f"total {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
