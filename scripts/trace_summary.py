"""Where did the GPU wait? Summarise torch.profiler chrome traces (from scripts/profile_step.py --trace);
the analysis is train.trace_summary.

    python scripts/trace_summary.py TRACE.json[.gz] [...] [--top 12] [--late-us 30]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.trace_summary import load_events, summarise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--late-us", type=float, default=30.0)
    args = ap.parse_args()
    for path in args.traces:
        print(f"== {path}")
        print(summarise(load_events(path), args.top, args.late_us))


if __name__ == "__main__":
    main()
