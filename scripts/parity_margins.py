"""How far a distributed layout and one process end apart in the CPU parity tests (tests/test_train_distributed.py).

Prints the greatest parameter difference after the test's 5 steps for the accumulation layout (2 ranks, 2 micro-steps
each) and, with --compile, the compiled layout (MP 2, activation checkpointing, compile), under the test's optimizer
settings or the ones given. Used to choose the tests' tolerance on a given CPU; see BENCHMARKS.md.

    python scripts/parity_margins.py [--compile] [--optim "optim.eps=1e-8,optim.lr=1e-2,optim.value_lr=3e-2"]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def greatest_difference(result, ref):
    diff, name = max(((p - ref[1][n]).abs().max().item(), n) for n, p in result[1].items())
    return f"max |param diff| {diff:.3g} in {name}, max |loss diff| {max(abs(a - b) for a, b in zip(result[0], ref[0])):.2g}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also the compiled layout (slow: inductor on CPU)")
    parser.add_argument("--optim", default="", help="comma-separated optim.* overrides applied after the test's own")
    args = parser.parse_args()
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    import conftest  # noqa: F401  (the test environment)
    import torch
    import test_train_distributed as t

    # passed as overrides (not by patching the module): the spawned ranks import the test module afresh
    optim = [o for o in args.optim.split(",") if o]
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, optimizer {t.LINEAR_ADAM + optim}", flush=True)
    *result, _ = t.run_distributed(2, optim, grad_accum=2, probe=t.AccumulationProbe())
    print("accumulation:", greatest_difference(tuple(result), t.reference(2, overrides=optim)), flush=True)
    if args.compile:
        layout = optim + ["dist.memory_parallel=2", "train.activation_checkpointing=true", "train.compile=true"]
        ref = t.reference(2, overrides=optim + t.code_path(layout))
        print("compiled:", greatest_difference(t.run_distributed(2, layout), ref))


if __name__ == "__main__":
    main()
