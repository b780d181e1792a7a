"""Training throughput of several models in one run: tokens/s, MFU, peak memory, and where the step's GPU time goes.

    python scripts/bench_train.py [--models dense_373m,memory_373m] [--batch 4 --seq 4096] [--warmup 10 --steps 20]
        [--profile-steps 3] [--peak-tflops 989] [--append BENCHMARKS.md] [--json FILE] [--note TEXT] [key=value ...]
        [--value-optimizers adamw,sparse_adam,rowwise_adagrad [--loss-steps 300 --loss-dir DIR]]

Each model is a config (a name under configs/ or a path), built and stepped exactly as the trainer does
(train/bench_steps.py) on random tokens, with torch.compile and bf16 autocast unless overrides say otherwise;
overrides apply to every model. A model may carry its own overrides after `+` signs, so that variants of one
config are measured against it in the same run, e.g.
`--models dense_373m,dense_373m+model.residual_dtype=autocast+train.compile_scope=model`.
MFU = tokens/s x model.flops.flops_per_token(cfg, seq_len) / peak bf16 FLOP/s (from the GPU's name, or
--peak-tflops). The profiler split sums each CUDA kernel's time per step into parts (attention, FFN matmuls,
memory search, lookup, optimizer, loss, ...); matrix products are told apart by the shapes of the op that
launched them. --append adds the table to a markdown file (card, date, command, and the
ratio of each model's throughput to the first model's).
A Memory+ row also gives the share of value rows each memory layer read in one step after the timed ones. Early in
training the reads narrow; on random tokens they fall to a few hundred rows per layer within ~200 steps and stay
there, and the step gets faster with them, so a long --warmup measures a memory that no longer spreads its reads
(BENCHMARKS.md, "the memory's reads narrow early in training").

--value-optimizers runs every model once per value-table optimizer (optim.value_optimizer), rows named
"model [optimizer]", each with its optimizer state (GiB, all of it and the value table's part). --loss-steps N then
also trains each of them N steps on the config's own data (as `python -m train` does, warmup N/10, no checkpoints)
into --loss-dir and prints scripts/compare_runs.py over those runs: loss parity against the first optimizer.
--steps 0 skips the throughput rows (only the loss runs).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import shlex
import sys
import tempfile
from collections import defaultdict
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from train.bench_steps import build_steps, time_steps  # noqa: E402
from train.trace_summary import load_events  # noqa: E402
from model import attention_kernel, prepare_attention  # noqa: E402
from model.flops import flops_per_token  # noqa: E402
from train.config import load_config  # noqa: E402
from train.memory_health import track_memory_usage  # noqa: E402
from train.runtime import setup_runtime  # noqa: E402
from train.value_optim import optimizer_state_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 tensor-core peak (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "B200": 2250.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def model_spec(spec: str) -> Tuple[str, List[str]]:
    """`name+key=value+key=value` -> (name, [key=value, ...]); a `+` inside a value (1e+3) is kept."""
    name, *overrides = re.split(r"\+(?=[A-Za-z_][\w.]*=)", spec)
    return name, overrides


def config_path(name: str) -> str:
    if os.path.exists(name):
        return name
    return os.path.join(ROOT, "configs", name if name.endswith(".yaml") else name + ".yaml")


# ------------------------------------------------------------------------------------------- profiler split
def _dims(op: dict) -> List[int]:
    out = []
    for d in op.get("args", {}).get("Input Dims", []) or []:
        if isinstance(d, list):
            out.extend(x for x in d if isinstance(x, int))
    return out


def classify(kernel: str, op_name: str, dims: List[int], cfg) -> str:
    """The step part a kernel belongs to, from its name and the op (name, input shapes) that launched it."""
    k, op = kernel.lower(), op_name.lower()
    m = cfg.model
    has_memory = bool(m.memory.resolved_layers(m.n_layers))
    is_gemm = any(s in k for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas")) or op in (
        "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
    if "memcpy" in k and "htod" in k.replace(" ", "").replace("_", ""):
        return "data (host to device)"
    # before the GEMM test: FlashAttention-4's kernels are CuTe (cutlass) kernels
    if any(s in k for s in ("flash", "fmha", "attention")) or "scaled_dot_product" in op or "flash4" in op:
        return "attention"
    if "_softmax_xent" in k or "nll_loss" in op or "log_softmax" in op or "cross_entropy" in op:
        return "loss (softmax, CE)"
    if is_gemm:
        if op == "aten::bmm" and has_memory:
            return "memory search"
        if m.hidden_dim in dims:
            return "FFN matmuls"
        if m.vocab_size in dims:
            return "output matmuls"
        if has_memory and m.memory.heads * m.memory.k_dim in dims:
            return "memory query matmul"
        if not dims:
            return "matmuls (unattributed)"
        return "attn + memory proj matmuls" if has_memory else "attention proj matmuls"
    if any(s in k for s in ("_pk_search", "_dense_grad_rows", "search")):
        return "memory search"
    if any(s in k for s in ("_lookup_fwd", "_segment_bwd", "_zero_untouched")):
        return "memory lookup"
    if has_memory and any(s in op for s in ("aten::sort", "aten::cumsum", "aten::searchsorted", "aten::index_fill")):
        return "memory lookup"
    if "embedding" in op or "embedding" in k:
        return "embedding"
    if "adam" in k or "adam" in op:
        return "optimizer"
    if "_foreach" in op or "multi_tensor" in k:
        return "grad norm + clip"
    if k.startswith("triton_"):
        return "fused elementwise (compiled)"
    return "other (eager)"


def profile_split(setup, steps: int) -> Dict[str, float]:
    """ms per step of GPU kernel time by part, plus the step's wall time under the profiler."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            setup.step()
        setup.sync()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = load_events(path)
    ops = {}
    for e in events:
        if e.get("cat") == "cpu_op":
            ext = e.get("args", {}).get("External id")
            if ext is not None:
                ops.setdefault(ext, e)  # outermost first is fine: dims are what matter
    # Innermost op per external id: later (nested) ops overwrite outer ones when they start later.
    for e in sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"]):
        ext = e.get("args", {}).get("External id")
        if ext is not None:
            ops[ext] = e
    parts: Dict[str, float] = defaultdict(float)
    kernels: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    for e in gpu:
        op = ops.get(e.get("args", {}).get("External id"), {})
        part = classify(e["name"], op.get("name", ""), _dims(op), setup.cfg)
        parts[part] += e["dur"] / 1e3 / steps
        kernels[part][f"{op.get('name', '?')} :: {e['name'][:90]}"] += e["dur"] / 1e3 / steps
    if gpu:
        t0 = min(e["ts"] for e in gpu)
        t1 = max(e["ts"] + e["dur"] for e in gpu)
        parts["(window, profiled)"] = (t1 - t0) / 1e3 / steps
    top = {part: sorted(ks.items(), key=lambda kv: -kv[1])[:8] for part, ks in kernels.items()}
    return dict(parts), top


# ------------------------------------------------------------------------------------------- main
def bench_model(name: str, overrides: List[str], args, rt_holder: dict, label: str = "") -> dict:
    cfg = load_config(config_path(name), overrides)
    if "rt" not in rt_holder:
        rt_holder["rt"] = setup_runtime(cfg)
    rt = rt_holder["rt"]
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    note = prepare_attention(cfg.model, rt.device, rt.dtype)
    if note:
        print(f"{label or name}: {note}", flush=True)
    setup = build_steps(cfg, rt, args.warmup + args.steps + args.profile_steps)
    step_s = time_steps(setup, args.warmup, args.steps)
    tokens = setup.tokens_per_step
    flops = flops_per_token(cfg.model, cfg.data.seq_len).total
    state = optimizer_state_bytes(setup.optimizer)
    row = {
        "model": label or name,
        "params_M": sum(p.numel() for p in setup.model.parameters()) / 1e6,
        "tokens_per_step": tokens,
        "step_ms": step_s * 1e3,
        "tokens_per_s": tokens / step_s,
        "flops_per_token": flops,
        "graphs_compiled": int(counters["stats"].get("unique_graphs", 0)),
        "attention": attention_kernel(cfg.model.attention_backend, cfg.model.head_dim, rt.device, rt.dtype),
        # the blocks' linear weights (train.weight_dtype): bf16 with fp32 masters, or fp32 cast by autocast
        "weights": "bf16" if getattr(setup.optimizer, "masters", None) else "fp32",
        "optim_state_gib": sum(state.values()) / 2**30,
        "value_state_gib": state.get("values", 0) / 2**30,
    }
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name())
        if peak:
            row["mfu"] = row["tokens_per_s"] * flops / (peak * 1e12)
    if args.profile_steps and cuda:
        row["split_ms"], row["top_kernels"] = profile_split(setup, args.profile_steps)
    spread = rows_read(setup)
    if spread:
        row["rows_read"] = spread
    del setup
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _shares(spread) -> str:
    return " / ".join(f"{100 * v:.1f}%" for v in spread.values()) if spread else "–"


def rows_read(setup) -> Dict[int, float]:
    """{block index: share of the value rows its memory layer reads} in one more, untimed step ({} for a model
    without memory layers). On random tokens the reads narrow within a few hundred steps (to a few hundred rows
    per layer), and a lookup over few rows is cheaper: the share says which regime the timed steps saw. Counting
    changes what the memory blocks trace, so they compile once more here."""
    usage = track_memory_usage(setup.model)
    if not usage:
        return {}
    setup.step()
    setup.sync()
    return {layer: counter.read()["rows_read"] for layer, counter in sorted(usage.items())}


def table(rows: List[dict]) -> str:
    base = rows[0]["tokens_per_s"]
    lines = ["| model | attention | weights | tokens/step | step ms | tok/s | vs first | MFU | peak GiB "
             "| optim state GiB (values) | graphs | rows read |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "–"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "–"
        lines.append(f"| {r['model']} | {r.get('attention', '–')} | {r.get('weights', '–')} | {r['tokens_per_step']} | {r['step_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}k | "
                     f"{r['tokens_per_s'] / base:.3f} | {mfu} | {peak} | {r['optim_state_gib']:.2f} ({r['value_state_gib']:.2f}) | "
                     f"{r['graphs_compiled']} | {_shares(r.get('rows_read'))} |")
    split_rows = [r for r in rows if "split_ms" in r]
    if split_rows:
        keys = sorted({k for r in split_rows for k in r["split_ms"]}, key=lambda k: -max(r["split_ms"].get(k, 0) for r in split_rows))
        lines += ["", "GPU kernel time per step (ms), by part:", "",
                  "| part | " + " | ".join(r["model"] for r in split_rows) + " |",
                  "|---|" + "---|" * len(split_rows)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{r['split_ms'].get(k, 0.0):.2f}" for r in split_rows) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="dense_373m,memory_373m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (0: no throughput rows)")
    ap.add_argument("--profile-steps", type=int, default=0, help="profiled steps for the split (0: none)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s (default: from the GPU name)")
    ap.add_argument("--append", default=None, help="markdown file to append the table to (e.g. BENCHMARKS.md)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--note", default="", help="a line of context for --append")
    ap.add_argument("--value-optimizers", default=None,
                    help="comma list of optim.value_optimizer values: each model runs once with each")
    ap.add_argument("--loss-steps", type=int, default=0,
                    help="with --value-optimizers: also train each this many steps on real data and compare losses")
    ap.add_argument("--loss-dir", default="runs/bench_value_optimizers", help="run dirs of the --loss-steps runs")
    args, extra = ap.parse_known_args()
    overrides = [f"train.batch_size={args.batch}", f"data.seq_len={args.seq}", "train.compile=true",
                 "train.precision=bf16", "train.grad_accum=1", "dist.memory_parallel=1"] + extra
    holder: dict = {}
    rows = []
    variants = args.value_optimizers.split(",") if args.value_optimizers else [None]
    for spec, vopt in ((n, v) for n in args.models.split(",") for v in variants if args.steps > 0):
        name, own = model_spec(spec)
        extra_vopt = [f"optim.value_optimizer={vopt}"] if vopt else []
        row = bench_model(name, overrides + own + extra_vopt, args, holder, label=f"{spec} [{vopt}]" if vopt else spec)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
        for part, ks in row.get("top_kernels", {}).items():
            if part.startswith(("other", "memory", "fused", "attention (")):
                print(f"  {spec} | {part}: " + "; ".join(f"{k} {ms:.2f}" for k, ms in ks), flush=True)
    out = table(rows) if rows else ""
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.append and rows:
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        import triton

        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python scripts/bench_train.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        with open(args.append, "a") as f:
            f.write(f"\n### bench_train — {date}, {card}, torch {torch.__version__}, triton {triton.__version__}\n")
            if args.note:
                f.write(f"{args.note}\n")
            f.write(f"Command: `{cmd}` (random tokens, compile, bf16 autocast, one GPU; {args.steps} timed steps "
                    f"after {args.warmup}). \"vs first\" is the throughput ratio to the first model of the same "
                    f"run; \"rows read\": the share of value rows each memory layer read in one step after the "
                    f"timed ones.\n\n")
            f.write(out + "\n")
    if args.loss_steps and args.value_optimizers:
        loss_comparison(args, overrides, variants)
    if "rt" in holder:
        holder["rt"].close()


def loss_comparison(args, overrides: List[str], variants: List[str]) -> None:
    """Each model x value optimizer trains --loss-steps steps on its config's data; compare_runs prints the parity."""
    import subprocess

    from train.loop import run

    steps = args.loss_steps
    for spec in args.models.split(","):
        name, own = model_spec(spec)
        dirs = []
        for vopt in variants:
            run_dir = os.path.join(args.loss_dir, f"{os.path.basename(spec).removesuffix('.yaml')}_{vopt}")
            if os.path.exists(run_dir):  # never mix with (or delete) an earlier run's metrics
                sys.exit(f"--loss-dir: {run_dir} already exists; pass a new --loss-dir")
            dirs.append(run_dir)
            torch._dynamo.reset()  # a fresh model per run: no compiled graphs or recompile counts carried over
            run(load_config(config_path(name), overrides + own + [
                f"optim.value_optimizer={vopt}", f"run_dir={run_dir}", f"train.steps={steps}",
                f"optim.warmup_steps={max(1, steps // 10)}", "train.log_every=10", "train.val_every=0",
                "checkpoint.every=0", "checkpoint.save_final=false", "checkpoint.resume=false"]))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"\nloss parity, {spec}, {steps} steps on its data (first: {variants[0]}):", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare_runs.py"), *dirs,
                        "--skip", str(min(20, steps // 4)), "--tail", str(max(1, min(50, steps // 5)))], check=True)


if __name__ == "__main__":
    main()
