"""Teach a pretrained model facts about new people, training only its memory, only its FFNs, or everything.

1. Pretrain (or reuse --base RUN_DIR): the facts experiment's memory model on old people + general text.
2. From its weights (checkpoint.init_from), finetune on documents about new people only, one run per
   train.trainable in --modes, with the same data, steps and learning rates.
3. Table: new facts learned (QA exact match on the new people: trained pairs, and prose-only people in held-out
   wordings), forgetting (general-text validation NLL and QA on the old people, before -> after).

    python scripts/knowledge_update.py --out runs/update [--base runs/facts/memory] [key=value ...]

Trailing key=value arguments override the config for every run (pretraining and finetuning).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.facts_experiment import GENERAL_TRAIN, GENERAL_VAL, data_overrides, mean_tokens, run_one  # noqa: E402
from data.config import resolve_path  # noqa: E402
from data import load_tokenizer  # noqa: E402
from eval.synthetic_facts import generate  # noqa: E402
from train.config import load_config  # noqa: E402

TASKS = ("qa_trained", "qa_prose")


def count_reads(model, usage, data_cfg, tokenizer, n_batches, batch_size):
    """Value-row reads (summed over memory layers) of `model` on n_batches of `data_cfg`'s train split."""
    import torch

    from data import build_loader

    loader = build_loader(data_cfg, tokenizer, split="train", rank=0, world_size=1, batch_size=batch_size)
    model.train()  # counters count training forwards only; no dropout in the model
    with torch.no_grad():
        for i, batch in zip(range(n_batches), loader):
            model(batch[:, :-1])
    total = sum(u.counts for u in usage.values())
    for u in usage.values():
        u.counts.zero_()
    return total.double()


def rank_rows(base, new_train, background_overrides, config, tokenizer, k, n_batches=40):
    """The k value rows most specific to the new documents: TF-IDF of reads on them against a background sample
    (the pretraining mixture), as in sparse memory finetuning."""
    import math

    from model.checkpoint import load_model
    from train.memory_health import track_memory_usage

    model, _ = load_model(base)
    usage = track_memory_usage(model)
    cfg = load_config(config, [f"data.train=[{{paths: [{new_train}]}}]"])
    new = count_reads(model, usage, cfg.data, tokenizer, n_batches, cfg.train.batch_size)
    bg = count_reads(model, usage, load_config(config, background_overrides).data, tokenizer, n_batches,
                     cfg.train.batch_size)
    score = new / new.sum() * ((bg.sum() + len(bg)) / (bg + 1)).log()
    score[new == 0] = -math.inf
    top = score.topk(min(k, int((new > 0).sum()))).indices
    return sorted(top.tolist())


def evaluate_base(base, cfg, tokenizer):
    """The pretrained model's metrics on the finetuning runs' evaluation: the same validation batches
    (train.val_batches of train.batch_size) and QA tasks, on the device and precision they train with."""
    import torch

    from eval import fixed_val_batches, flatten, load_eval_tasks, run_tasks, validation_metrics
    from model.checkpoint import load_model
    from model.device import pick_dtype

    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    model, _ = load_model(base, device=device)
    dtype = pick_dtype(cfg.train.precision, device)
    batches = fixed_val_batches(cfg.data, tokenizer, cfg.train.val_batches, cfg.train.batch_size)
    out = {"val_loss": validation_metrics(model, batches, tokenizer, amp_dtype=dtype)["val/loss"]}
    results = flatten(run_tasks(model, tokenizer, cfg.eval, step=0, tasks=load_eval_tasks(cfg.eval), amp_dtype=dtype))
    out.update({k[len("eval/"):]: v for k, v in results.items() if k.endswith("/em")})
    del model
    return out


def finetune_data(new_train, old_dir, replay_share, tokenizer):
    """data.train of the finetuning runs: the new people's documents, plus with replay_share > 0 that share of
    the tokens from the pretraining mixture (old people and general text, half each by tokens)."""
    if replay_share <= 0:
        return f"data.train=[{{paths: [{new_train}]}}]"
    old_train = os.path.join(old_dir, "train.jsonl")
    means = {p: mean_tokens(resolve_path(p), tokenizer) for p in (new_train, old_train, GENERAL_TRAIN)}
    weights = {new_train: (1 - replay_share) / means[new_train], old_train: replay_share / 2 / means[old_train],
               GENERAL_TRAIN: replay_share / 2 / means[GENERAL_TRAIN]}
    low = min(weights.values())
    return "data.train=[" + ", ".join(f"{{paths: [{p}], weight: {w / low:.4f}}}" for p, w in weights.items()) + "]"


def tasks_override(sets, copy_dir):
    """eval.tasks for {prefix: facts dir}: task names come from the file names, so each set gets copies (in
    copy_dir)."""
    specs = []
    for prefix, d in sets.items():
        for t in TASKS:
            path = os.path.join(copy_dir, f"{prefix}_{t}.jsonl")
            with open(os.path.join(d, f"{t}.jsonl")) as src, open(path, "w") as dst:
                dst.write(src.read())
            specs.append(f"jsonl:{path}")
    return f"eval.tasks=[{','.join(specs)}]"


def metrics(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for rec in map(json.loads, f):
            if "val/loss" in rec:
                out["val_loss"] = rec["val/loss"]
            out.update({k[len("eval/"):]: v for k, v in rec.items() if k.startswith("eval/") and k.endswith("/em")})
    return out


def write_table(rows, out):
    """The markdown table of `rows` (the first is the pretrained model), also written to out/results.md."""
    b = rows[0]
    lines = ["| run | new: trained QA EM | new: prose-only EM | old: trained QA EM | old: prose-only EM | "
             "general val NLL (rise) |", "|---|---|---|---|---|---|"]
    for r in rows:
        rise = 100 * (r["val_loss"] / b["val_loss"] - 1)
        lines.append(f"| {r['run']} | {r['new_qa_trained/em']:.3f} | {r['new_qa_prose/em']:.3f} | "
                     f"{r['old_qa_trained/em']:.3f} | {r['old_qa_prose/em']:.3f} | {r['val_loss']:.4f} ({rise:+.1f}%) |")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    return table


def run_at_once(config, jobs, parallel, threads=0):
    """Each finetuning run as its own `python -m train` process, `parallel` at a time (small models leave a GPU
    mostly idle); yields (mode, run_dir, overrides, seconds) as they finish. A failed run stops the command."""
    import subprocess
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    queue, live = list(jobs), {}
    while queue or live:
        while queue and len(live) < parallel:
            mode, run_dir, ft = queue.pop(0)
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "log.txt"), "w")
            cmd = [sys.executable, "-m", "train", f"config={config}", *ft]
            print(f"== finetune {mode} (log: {log.name})", flush=True)
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
            proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
            live[mode] = (proc, log, run_dir, ft, time.perf_counter())
        for mode, (proc, log, run_dir, ft, t0) in list(live.items()):
            if proc.poll() is None:
                continue
            log.close()
            del live[mode]
            if proc.returncode:
                with open(log.name, errors="replace") as f:
                    tail = "".join(f.readlines()[-20:])
                for other in live.values():
                    other[0].kill()
                raise SystemExit(f"finetune {mode}: exit {proc.returncode}; the end of {log.name}:\n{tail}")
            yield mode, run_dir, ft, time.perf_counter() - t0
        time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/facts_small.yaml")
    p.add_argument("--base", default=None, help="a pretrained run dir (default: pretrain one under --out)")
    p.add_argument("--entities", type=int, default=100, help="old people (pretraining)")
    p.add_argument("--old-data", default=None,
                   help="with --base: the old people's facts directory that base was trained on (eval.synthetic_facts "
                        "output, e.g. a facts sweep's data/<set>) instead of generating --entities people")
    p.add_argument("--new-entities", type=int, default=20)
    p.add_argument("--docs-per-entity", type=int, default=4)
    p.add_argument("--facts-share", type=float, default=0.7, help="pretraining: share of tokens from facts")
    p.add_argument("--steps", type=int, default=150, help="finetuning steps")
    p.add_argument("--lr", type=float, default=3e-3, help="finetuning base rate (values: value_lr_mult x)")
    p.add_argument("--modes", default="memory,ffn,all", help="train.trainable values, and `rows`: the "
                   "--rows-topk value rows most specific to the new data (train.trainable_rows)")
    p.add_argument("--rows-topk", type=int, default=256)
    p.add_argument("--replay-share", type=float, default=0.0,
                   help="share of finetuning tokens from the pretraining mixture (old people + general text)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--parallel", type=int, default=1,
                   help="finetuning runs at once, each its own process (1: one after another, in this process)")
    args, overrides = p.parse_known_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.old_data and args.base is None:
        raise SystemExit("--old-data: only with --base (the people that base was trained on)")
    old_dir = os.path.abspath(args.old_data or os.path.join(args.out, "old"))
    new_dir = os.path.abspath(os.path.join(args.out, "new"))
    if not args.old_data:
        generate(old_dir, args.entities, 0, args.docs_per_entity, 0.5)
    generate(new_dir, args.new_entities, 1000, args.docs_per_entity, 0.5)  # other seed: other people
    tokenizer = load_tokenizer(load_config(args.config, overrides).data.tokenizer)
    task_dir = os.path.abspath(os.path.join(args.out, "tasks"))
    os.makedirs(task_dir, exist_ok=True)
    tasks = tasks_override({"old": old_dir, "new": new_dir}, task_dir)

    base = args.base
    if base is None:
        base = os.path.abspath(os.path.join(args.out, "base"))
        pre = overrides + data_overrides(old_dir, args.facts_share, tokenizer)[:2] + [
            tasks, f"run_dir={base}", "checkpoint.save_final=true", "checkpoint.every=0"]
        print("== pretraining", flush=True)
        run_one(args.config, pre)
    if not 0 <= args.replay_share < 1:
        raise SystemExit(f"--replay-share: must be in [0, 1), got {args.replay_share}")
    ft_data = finetune_data(os.path.join(new_dir, "train.jsonl"), old_dir, args.replay_share, tokenizer)
    common = [ft_data, f"data.val=[{{paths: [{GENERAL_VAL}]}}]", tasks]
    print("== evaluating the pretrained model", flush=True)
    rows = [{"run": "base (before)", **evaluate_base(base, load_config(args.config, overrides + common), tokenizer)}]
    jobs = []  # (mode, run dir, overrides)
    for mode in [m for m in args.modes.split(",") if m]:
        run_dir = os.path.abspath(os.path.join(args.out, f"ft_{mode}"))
        extra = [f"train.trainable={mode}"]
        if mode == "rows":
            background = data_overrides(old_dir, args.facts_share, tokenizer)[:1]
            picked = rank_rows(base, os.path.join(new_dir, "train.jsonl"), background, args.config, tokenizer,
                               args.rows_topk)
            rows_file = os.path.join(args.out, "rows.json")
            with open(rows_file, "w") as f:
                json.dump(picked, f)
            print(f"== rows: {len(picked)} value rows most specific to the new people", flush=True)
            extra = ["train.trainable=values", f"train.trainable_rows={rows_file}"]
        ft = overrides + extra + common + [
            f"run_dir={run_dir}", f"checkpoint.init_from={base}",
            f"train.steps={args.steps}", f"optim.lr={args.lr}", "optim.warmup_steps=10", "optim.weight_decay=0.0",
            "checkpoint.save_final=false", "logging.memory_health=true",
        ]
        jobs.append((mode, run_dir, ft))

    order = {f"finetune {mode}": i for i, (mode, _, _) in enumerate(jobs)}

    def record(mode, run_dir, ft, seconds):
        entry = {"run": f"finetune {mode}", "seconds": round(seconds, 1), **metrics(run_dir)}
        rows.append(entry)
        rows[1:] = sorted(rows[1:], key=lambda r: order[r["run"]])  # runs at once finish in any order
        with open(os.path.join(args.out, "results.jsonl"), "a") as f:
            f.write(json.dumps({**entry, "overrides": ft}) + "\n")
        write_table(rows, args.out)  # after every run: a command stopped at a time limit keeps what it finished

    if args.parallel > 1:
        for mode, run_dir, ft, seconds in run_at_once(args.config, jobs, args.parallel, args.threads):
            record(mode, run_dir, ft, seconds)
    for mode, run_dir, ft in jobs if args.parallel <= 1 else []:
        print(f"== finetune {mode}", flush=True)
        record(mode, run_dir, ft, run_one(args.config, ft))

    print("\n" + write_table(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
