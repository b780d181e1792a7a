"""The stop-before-the-time-limit path across ranks and processes.

1. A 2-rank torchrun job (gloo, CPU) where only rank 1 gets SIGUSR1: every rank must agree, save one checkpoint
   together and exit 0, and the next start resumes from it.
2. The sbatch script's forwarding command signals this job's trainers only: not the torchrun agent (which
   would die of SIGUSR1) and not another job's trainer on the same node.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from _train_helpers import RUN_SMALL
from launch.slurm import _SIGNAL_WORKERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = RUN_SMALL + ["checkpoint.every=0"]
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")


def _children(pid: int):
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(name))
    return kids


def _environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode(errors="replace") for k, v in items}


def _torchrun(run_dir, steps, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "-m", "train",
           f"config={ROOT}/configs/tiny.yaml", *SMALL, f"run_dir={run_dir}", f"train.steps={steps}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank_with_one_checkpoint(tmp_path):
    proc = _torchrun(tmp_path, 100000, _free_port())
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("step 3/"):
                ranks = {_environ(p).get("RANK"): p for p in _children(proc.pid)}
                assert set(ranks) == {"0", "1"}, (ranks, "".join(out))
                os.kill(ranks["1"], signal.SIGUSR1)  # rank 0 prints; the signal reaches only the other rank
        assert proc.wait(timeout=120) == 0, "".join(out)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert "stop requested" in text, text
    saved = os.listdir(tmp_path / "checkpoints")
    assert len(saved) == 1, saved
    stopped = int(saved[0].split("_")[1])
    assert 3 <= stopped < 100000
    # the next start (the requeued job) resumes there and runs on
    again = _torchrun(tmp_path, stopped + 2, _free_port())
    text = again.communicate(timeout=120)[0]
    assert again.returncode == 0, text
    assert f"step_{stopped} at step {stopped}" in text, text
    assert f"step {stopped + 2}/{stopped + 2}" in text, text


_SLEEPER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *_: (open(sys.argv[1], 'w').close(), sys.exit(0)))\n"
    "time.sleep(60)\n"
)


def test_forwarding_command_signals_only_this_jobs_trainers(tmp_path):
    def start(tag, job, *argv):
        env = dict(os.environ, SLURM_JOB_ID=job)
        # the argument "-m train" makes the command line look like a trainer's (or, with torch.distributed.run,
        # like a torchrun agent's)
        return subprocess.Popen([sys.executable, "-c", _SLEEPER, str(tmp_path / tag), *argv, "-m", "train"], env=env)

    procs = {
        "trainer": start("trainer", "4242"),
        "agent": start("agent", "4242", "torch.distributed.run"),
        "other_job": start("other_job", "777"),
    }
    try:
        time.sleep(1.0)  # let the handlers be installed
        subprocess.run(["bash", "-c", _SIGNAL_WORKERS], env=dict(os.environ, SLURM_JOB_ID="4242"), check=True)
        assert procs["trainer"].wait(timeout=20) == 0
        time.sleep(0.5)
        assert procs["agent"].poll() is None and procs["other_job"].poll() is None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer"]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
