"""Data pipeline throughput: tokens/s per worker (jsonl + sentencepiece, memmap shards) and data wait.

    python scripts/bench_data.py [--input data/corpus/wiki_leads.train.jsonl.gz] \
        [--tokenizer data/corpus/tokenizer.model] [--seconds 5] [--workers 2] [--step-ms 50]

1. jsonl + sentencepiece, tokenizing in the loading process (num_workers=0): what one worker sustains,
   parsing, tokenizing and packing included.
2. the same with --workers background processes (total tokens/s; / workers for per worker).
3. memmap: the input pretokenized by data.pretokenize into a temp dir, read through the same loader.
4. data wait: a simulated training step of --step-ms (sleep, so it leaves the CPU to the workers, as a
   GPU step does) consuming batch_size x seq_len tokens; reports the share of wall time spent in next(loader).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataConfig, SourceConfig, build_loader, load_tokenizer  # noqa: E402
from data.pretokenize import pretokenize  # noqa: E402


def rate(cfg, tok, batch_size: int, seconds: float) -> float:
    it = iter(build_loader(cfg, tok, batch_size=batch_size))
    next(it)  # start-up (worker fork, first file open) is not throughput
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it).numel()
    return n / (time.perf_counter() - t0)


def wait_share(cfg, tok, batch_size: int, steps: int, step_s: float) -> float:
    it = iter(build_loader(cfg, tok, batch_size=batch_size))
    next(it)
    time.sleep(1.0)  # workers fill their prefetch queue, as they do during model set-up
    waited, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        w = time.perf_counter()
        next(it)
        waited += time.perf_counter() - w
        time.sleep(step_s)
    return waited / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default="data/corpus/wiki_leads.train.jsonl.gz")
    ap.add_argument("--tokenizer", default="data/corpus/tokenizer.model")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--step-ms", type=float, default=50.0)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    tok = load_tokenizer(a.tokenizer)

    def cfg(paths, workers=0):
        return DataConfig(train=[SourceConfig(paths=[paths])], tokenizer=a.tokenizer, seq_len=a.seq_len,
                          num_workers=workers, pin_memory=False)

    src = os.path.abspath(a.input)
    print(f"input {a.input}, tokenizer {a.tokenizer} (vocab {tok.vocab_size}), batch {a.batch_size}x{a.seq_len + 1}, "
          f"{os.cpu_count()} cpus")
    r0 = rate(cfg(src), tok, a.batch_size, a.seconds)
    print(f"jsonl+spm, in-process (1 worker):        {r0 / 1e3:10.0f} k tokens/s")
    if a.workers:
        rw = rate(cfg(src, a.workers), tok, a.batch_size, a.seconds)
        print(f"jsonl+spm, {a.workers} workers:                  {rw / 1e3:10.0f} k tokens/s total, "
              f"{rw / a.workers / 1e3:.0f} k per worker")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        idx = pretokenize([src], a.tokenizer, tmp, workers=max(1, a.workers))
        speed = idx["n_tokens"] / (time.perf_counter() - t)
        print(f"pretokenize ({max(1, a.workers)} procs):                {speed / 1e3:10.0f} k tokens/s "
              f"({idx['n_tokens']} tokens)")
        rm = rate(cfg(tmp), tok, a.batch_size, a.seconds)
        print(f"memmap shards, in-process:               {rm / 1e6:10.1f} M tokens/s")
    need = a.batch_size * (a.seq_len + 1) / (a.step_ms / 1e3)
    for workers in sorted({0, a.workers}):
        share = wait_share(cfg(src, workers), tok, a.batch_size, a.steps, a.step_ms / 1e3)
        print(f"data wait, jsonl+spm, {workers} workers, {a.step_ms:.0f} ms steps "
              f"({need / 1e3:.0f} k tokens/s needed): {100 * share:.2f}% of step time")


if __name__ == "__main__":
    main()
