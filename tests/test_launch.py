"""Launch helpers build the commands and scripts we document."""
import subprocess
import sys

from launch.common import split_args
from launch.slurm import DEFAULTS, sbatch_script
from launch.sweep import build_sweep, parse_sweep, sweep_points
from launch.torchrun import torchrun_command


def test_torchrun_single_node_is_standalone():
    cmd = torchrun_command(["config=c.yaml"], nodes=1, gpus_per_node=8)
    assert "--standalone" in cmd and "--nproc-per-node=8" in cmd
    assert cmd[-3:] == ["-m", "train", "config=c.yaml"][-3:]


def test_torchrun_multi_node_uses_c10d_rendezvous():
    cmd = torchrun_command(["x=1"], nodes=4, gpus_per_node=8, rdzv_endpoint="n0:29500")
    assert "--nnodes=4" in cmd and "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=n0:29500" in cmd
    assert "--standalone" not in cmd


def test_sbatch_script_for_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path}/run\ntrain:\n  steps: 100\n")
    opts, train_args = split_args(
        [f"config={cfg}", "nodes=2", "gpus_per_node=4", "time=01:00:00", "train.steps=7"], DEFAULTS
    )
    assert opts["nodes"] == 2 and train_args == [f"config={cfg}", "train.steps=7"]
    script = sbatch_script(train_args, opts)
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --time=01:00:00" in script
    assert f"#SBATCH --signal=B:USR1@{DEFAULTS['signal_lead_s']}" in script
    assert f"--output={tmp_path}/run/slurm-%j.out" in script
    assert "--nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500" in script
    assert "train.steps=7" in script and "scontrol requeue" in script and "trap forward_usr1 USR1" in script
    # the script is valid bash
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_dry_run_prints_script(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.slurm", "--dry-run", "nodes=3", f"run_dir={tmp_path}/r"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "#SBATCH --nodes=3" in out and not (tmp_path / "r").exists()


def test_sweep_without_a_run_dir_roots_at_the_presets(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: runs/a\n")
    axes, rest = parse_sweep(["sweep.optim.lr=[0.1,0.2]", f"config={cfg}"])
    assert build_sweep(axes, rest).run_dir == "runs/a"
    axes, rest = parse_sweep(["sweep.optim.lr=[0.1,0.2]", f"config={cfg}", "run_dir=runs/b"])
    assert build_sweep(axes, rest).run_dir == "runs/b"


def test_run_dir_of_a_checkpoint_is_its_run(tmp_path):
    from model.checkpoint import run_dir_of

    assert run_dir_of(str(tmp_path / "r" / "checkpoints" / "step_4")) == str(tmp_path / "r")
    assert run_dir_of(str(tmp_path / "r")) == str(tmp_path / "r")


def test_sweep_grid_gives_distinct_run_dirs():
    axes, rest = parse_sweep(["sweep.model.memory.n_keys=[16,32]", "sweep.optim.lr=[0.1,0.2,0.3]", "run_dir=r"])
    points = sweep_points(axes, rest)
    assert len(points) == 6
    dirs = {p[-1] for p in points}
    assert len(dirs) == 6 and all(d.startswith("run_dir=r/") for d in dirs)
    assert "model.memory.n_keys=32" in points[-1] and "optim.lr=0.3" in points[-1]
