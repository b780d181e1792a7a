"""Write (and submit) an sbatch script for a multi-node run.

    python -m launch.slurm config=configs/x.yaml nodes=4 gpus_per_node=8 time=24:00:00 [--dry-run] [key=value ...]

The trainer's config (and its parallel layout for nodes x gpus_per_node ranks) is checked first; nothing is
written or submitted when it is wrong. The script goes to <run_dir>/launch.sbatch. srun starts one torchrun per node; the first node of the
allocation hosts the c10d rendezvous. SLURM sends SIGUSR1 `signal_lead_s` seconds before the time limit;
the trainer saves a checkpoint on it and exits, and `--requeue` puts the job back in the queue, where the
next start resumes from that checkpoint (the trainer resumes automatically from the run directory).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Dict, List, Tuple

from .common import join, launcher_main, split_args, trainer_config
from .torchrun import torchrun_command

# Run on every node of the job (srun --overlap). It signals the trainer processes of this job only: not the
# torchrun agents (their command line names torch.distributed.run, and so does this script's own), and not
# another job's trainers on a shared node (their environment holds another SLURM_JOB_ID).
_SIGNAL_WORKERS = (
    "for p in $(pgrep -f -- '-m train'); do "
    "grep -qa torch.distributed.run /proc/$p/cmdline && continue; "
    "tr '\\0' '\\n' < /proc/$p/environ 2>/dev/null | grep -qx \"SLURM_JOB_ID=$SLURM_JOB_ID\" && kill -USR1 $p; "
    "done; true"
)

DEFAULTS: Dict[str, object] = {
    "nodes": 1,
    "gpus_per_node": 8,
    "time": "24:00:00",
    "partition": "",
    "account": "",
    "qos": "",
    "job_name": "mnemo",
    "cpus_per_task": 16,
    "signal_lead_s": 300,
    "port": 29500,
    "python": "python",
}


def _header(opts: Dict[str, object], output: str, array: str = "") -> List[str]:
    nodes, gpus = int(opts["nodes"]), int(opts["gpus_per_node"])
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={opts['job_name']}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --cpus-per-task={opts['cpus_per_task']}",
        f"#SBATCH --time={opts['time']}",
        f"#SBATCH --output={output}",
        # B: = signal the batch shell too; the trainer catches SIGUSR1, saves, exits; requeue restarts.
        f"#SBATCH --signal=B:USR1@{opts['signal_lead_s']}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]
    if array:
        lines.append(f"#SBATCH --array={array}")
    for key in ("partition", "account", "qos"):
        if opts[key]:
            lines.append(f"#SBATCH --{key}={opts[key]}")
    return lines


def _command_text(train_args: List[str], opts: Dict[str, object]) -> str:
    """The per-node torchrun command, with $VARS left unquoted so the shell expands them on each node."""
    cmd = torchrun_command(
        train_args,
        nodes=int(opts["nodes"]),
        gpus_per_node=int(opts["gpus_per_node"]),
        rdzv_endpoint=f"$MASTER_ADDR:{opts['port']}",
        rdzv_id="$SLURM_JOB_ID",
        python=str(opts["python"]),
    )
    return " ".join(c if "$" in c else shlex.quote(c) for c in cmd)


def _body(command: str) -> List[str]:
    """Start `command` (shell text) on every node with srun; on SIGUSR1 make the trainers save, then requeue."""
    return [
        "set -euo pipefail",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        "",
        "# SLURM signals this batch shell (B:). torchrun's agent would die of SIGUSR1, so the signal goes to",
        "# the trainer processes only (children of torchrun, whose own command line is torch.distributed.run).",
        "REQUEUE=0",
        "forward_usr1() {",
        "  REQUEUE=1",
        "  echo \"caught USR1: asking every rank to checkpoint and exit\"",
        "  srun --overlap --ntasks-per-node=1 bash -c " + shlex.quote(_SIGNAL_WORKERS),
        "}",
        "trap forward_usr1 USR1",
        f"srun --kill-on-bad-exit=1 bash -c {command} &",
        "SRUN_PID=$!",
        "# wait returns early when the trap fires; wait again for the ranks to save and exit.",
        "wait $SRUN_PID || true",
        "wait $SRUN_PID",
        "# The time limit is near and the ranks saved: queue the job again; its next start resumes.",
        'if [ "$REQUEUE" = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        "",
    ]


def sbatch_script(train_args: List[str], opts: Dict[str, object]) -> str:
    """The sbatch script; raises ConfigError when the trainer's config or layout is wrong."""
    run_dir = trainer_config(train_args, DEFAULTS, int(opts["nodes"]) * int(opts["gpus_per_node"])).run_dir
    lines = _header(opts, f"{run_dir}/slurm-%j.out") + [""]
    return "\n".join(lines + _body(shlex.quote(_command_text(train_args, opts))))


def sbatch_array_script(points: List[Tuple[str, List[str]]], opts: Dict[str, object], sweep_dir: str) -> str:
    """One job array for a sweep: task i runs point i (name, trainer arguments) with the same resources as
    `sbatch_script`. Each task is its own job (own SLURM_JOB_ID): it is signalled, saves and is requeued alone,
    and its next start resumes from its run directory."""
    if not points:
        raise ValueError("a job array needs at least one point")
    array = f"0-{len(points) - 1}"
    if int(opts.get("array_parallel", 0) or 0) > 0:
        array += f"%{int(opts['array_parallel'])}"  # at most this many tasks at once
    lines = _header(opts, f"{sweep_dir}/slurm-%A_%a.out", array=array) + [""]
    lines += ["# One sweep point per array index.", 'case "$SLURM_ARRAY_TASK_ID" in']
    for i, (name, train_args) in enumerate(points):
        lines.append(f"  {i}) POINT={shlex.quote(name)}; POINT_CMD={shlex.quote(_command_text(train_args, opts))} ;;")
    lines += [
        '  *) echo "no sweep point for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
        'echo "sweep point $SLURM_ARRAY_TASK_ID: $POINT"',
        "",
    ]
    return "\n".join(lines + _body('"$POINT_CMD"'))


def _main(argv) -> int:
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    opts, train_args = split_args(argv, DEFAULTS)
    script = sbatch_script(train_args, opts)
    if dry_run:
        print(script)
        return 0
    run_dir = trainer_config(train_args, DEFAULTS).run_dir
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "launch.sbatch")
    with open(path, "w") as f:
        f.write(script)
    print(f"wrote {path}")
    return subprocess.call(["sbatch", path])


def main(argv=None) -> int:
    return launcher_main(__doc__, DEFAULTS, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
