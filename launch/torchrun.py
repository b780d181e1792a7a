"""torchrun commands for one node or several (c10d rendezvous).

    python -m launch.torchrun nodes=2 gpus_per_node=8 rdzv_endpoint=node0:29500 config=configs/x.yaml ...
prints the command to run on every node (the same on each; c10d assigns node ranks), after checking the trainer's
config and parallel layout for nodes x gpus_per_node ranks.
"""
from __future__ import annotations

import sys
from typing import List

from model.cli_config import ConfigError

from .common import join, launcher_main, split_args, trainer_config

DEFAULTS = {"nodes": 1, "gpus_per_node": 1, "rdzv_endpoint": "localhost:29500", "rdzv_id": "mnemo", "python": "python"}


def torchrun_command(
    train_args: List[str],
    nodes: int = 1,
    gpus_per_node: int = 1,
    rdzv_endpoint: str = "localhost:29500",
    rdzv_id: str = "mnemo",
    python: str = "python",
) -> List[str]:
    for key, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    cmd = [python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return cmd + ["-m", "train"] + list(train_args)


def _main(argv) -> int:
    opts, rest = split_args(argv, DEFAULTS)
    trainer_config(rest, DEFAULTS, world_size=opts["nodes"] * opts["gpus_per_node"])
    print(join(torchrun_command(rest, **opts)))
    return 0


def main(argv=None) -> int:
    return launcher_main(__doc__, DEFAULTS, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
