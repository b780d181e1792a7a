"""Do memory layers store facts a dense model of the same FLOPs cannot? Train the pair and print the table.

Writes synthetic people (eval/synthetic_facts.py, QA training documents for half of them), mixes their
documents with the bundled general corpus, and trains, one after the other with mnemo's own trainer:
- `memory`: the config as given (configs/facts_small.yaml: one FFN replaced by a Memory+ layer);
- `dense`: the same without memory layers, its FFN width raised until its training FLOPs per token
  (model/flops.py) are at least the memory model's;
plus any `--variant NAME='key=value;key=value'` (overrides on top of the config, e.g. memory settings).
Reported per run: QA exact match and answer NLL on (a) people whose QA pairs were trained (trained wording)
and (b) people seen only in biographies (held-out wordings), general-text validation NLL, FLOPs per token.

    python scripts/facts_experiment.py --out runs/facts [--config configs/facts_small.yaml] [key=value ...]

Trailing key=value arguments override the config for every run (e.g. train.steps=3000 train.device=cuda).
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import load_tokenizer  # noqa: E402
from data.config import resolve_path  # noqa: E402
from eval.synthetic_facts import generate  # noqa: E402
from model.flops import flops_per_token  # noqa: E402
from train.config import TrainConfig, load_config  # noqa: E402

GENERAL_TRAIN = "data/corpus/wiki_leads.train.jsonl.gz"
GENERAL_VAL = "data/corpus/wiki_leads.val.jsonl.gz"


def mean_tokens(path: str, tokenizer, limit: int = 500) -> float:
    opener = gzip.open if path.endswith(".gz") else open
    lengths = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            lengths.append(len(tokenizer.encode(json.loads(line)["text"])) + 2)
            if len(lengths) >= limit:
                break
    return sum(lengths) / len(lengths)


def data_overrides(facts_dir: str, facts_share: float, tokenizer) -> List[str]:
    """Train on facts and general text with `facts_share` of the tokens from facts (per-document weights)."""
    facts_train = os.path.join(facts_dir, "train.jsonl")
    w_facts = facts_share / mean_tokens(facts_train, tokenizer)
    w_general = (1 - facts_share) / mean_tokens(resolve_path(GENERAL_TRAIN), tokenizer)
    scale = 1.0 / min(w_facts, w_general)
    train = (f"data.train=[{{paths: [{facts_train}], weight: {w_facts * scale:.4f}}}, "
             f"{{paths: [{GENERAL_TRAIN}], weight: {w_general * scale:.4f}}}]")
    tasks = [f"jsonl:{os.path.join(facts_dir, f)}" for f in ("qa_trained.jsonl", "qa_prose.jsonl")]
    return [train, f"data.val=[{{paths: [{GENERAL_VAL}]}}]", f"eval.tasks=[{','.join(tasks)}]"]


def matched_dense(cfg: TrainConfig) -> List[str]:
    """Overrides that turn the memory config into a dense one of at least its FLOPs per token."""
    target = flops_per_token(cfg.model, cfg.data.seq_len).total
    dense = copy.deepcopy(cfg.model)
    dense.memory.layers, dense.memory.every, dense.memory.keep_ffn = [], None, False
    step = dense.multiple_of
    width = step
    while True:
        dense.ffn_dim = width
        if flops_per_token(dense, cfg.data.seq_len).total >= target:
            return ["model.memory.layers=[]", "model.memory.every=null", "model.memory.keep_ffn=false",
                    f"model.ffn_dim={width}"]
        width += step


def read_results(run_dir: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "val/loss" in rec:
                out["val_loss"] = rec["val/loss"]
            for task in ("qa_trained", "qa_prose"):
                for m in ("em", "answer_nll"):
                    if f"eval/{task}/{m}" in rec:
                        out[f"{task}/{m}"] = rec[f"eval/{task}/{m}"]
    return out


def run_one(config: str, overrides: List[str]) -> float:
    from train.loop import run

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    run(cfg)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for the data and the runs")
    p.add_argument("--config", default="configs/facts_small.yaml")
    p.add_argument("--entities", type=int, default=200)
    p.add_argument("--docs-per-entity", type=int, default=4)
    p.add_argument("--qa-fraction", type=float, default=0.5)
    p.add_argument("--facts-share", type=float, default=0.5, help="share of training tokens from the facts")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--runs", default="dense,memory", help="comma-separated run names to train (and variants)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME='k=v;k=v'",
                   help="an extra run: overrides on top of the config")
    args, overrides = p.parse_known_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    facts_dir = os.path.abspath(os.path.join(args.out, "data"))
    generate(facts_dir, args.entities, args.data_seed, args.docs_per_entity, args.qa_fraction)
    base_cfg = load_config(args.config, overrides)
    tokenizer = load_tokenizer(base_cfg.data.tokenizer)
    common = overrides + data_overrides(facts_dir, args.facts_share, tokenizer)
    variants = {"memory": [], "dense": matched_dense(load_config(args.config, common))}
    for spec in args.variant:
        name, _, body = spec.partition("=")
        variants[name] = [kv for kv in body.split(";") if kv]
    names = [n for n in args.runs.split(",") if n] + [v.partition("=")[0] for v in args.variant]

    rows = []
    for name in dict.fromkeys(names):
        if name not in variants:
            raise SystemExit(f"--runs: unknown run {name!r}; known: {', '.join(variants)}")
        run_dir = os.path.abspath(os.path.join(args.out, name))
        ov = common + variants[name] + [f"run_dir={run_dir}"]
        cfg = load_config(args.config, ov)
        flops = flops_per_token(cfg.model, cfg.data.seq_len).total
        print(f"== {name}: {' '.join(variants[name]) or '(config)'}", flush=True)
        seconds = run_one(args.config, ov)
        res = read_results(run_dir)
        rows.append({"run": name, "flops_per_token": flops, "seconds": round(seconds, 1), **res})
        with open(os.path.join(args.out, "results.jsonl"), "a") as f:
            f.write(json.dumps({**rows[-1], "overrides": ov}) + "\n")

    print("\n| run | FLOPs/token | (a) trained QA EM | (b) prose-only EM | (a) NLL | (b) NLL | general val NLL | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['flops_per_token'] / 1e6:.3f}M | {r.get('qa_trained/em', float('nan')):.3f} | "
              f"{r.get('qa_prose/em', float('nan')):.3f} | {r.get('qa_trained/answer_nll', float('nan')):.2f} | "
              f"{r.get('qa_prose/answer_nll', float('nan')):.2f} | {r.get('val_loss', float('nan')):.4f} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
