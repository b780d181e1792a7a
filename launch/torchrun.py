"""torchrun commands for one node or several (c10d rendezvous).

    python -m launch.torchrun nodes=2 gpus_per_node=8 rdzv_endpoint=node0:29500 config=configs/x.yaml ...
prints the command to run on every node (the same on each; c10d assigns node ranks).
"""
from __future__ import annotations

import sys
from typing import List

from .common import join, split_args

DEFAULTS = {"nodes": 1, "gpus_per_node": 1, "rdzv_endpoint": "localhost:29500", "rdzv_id": "mnemo", "python": "python"}


def torchrun_command(
    train_args: List[str],
    nodes: int = 1,
    gpus_per_node: int = 1,
    rdzv_endpoint: str = "localhost:29500",
    rdzv_id: str = "mnemo",
    python: str = "python",
) -> List[str]:
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes and gpus_per_node must be >= 1, got {nodes}, {gpus_per_node}")
    cmd = [python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return cmd + ["-m", "train"] + list(train_args)


def main(argv=None) -> int:
    opts, rest = split_args(sys.argv[1:] if argv is None else argv, DEFAULTS)
    print(join(torchrun_command(rest, **opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
