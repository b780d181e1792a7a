"""Sweeps: points from files and the command line, names that say what differs, validation before anything
starts, one SLURM job array, and a CPU demo sweep that runs, resumes after an interruption and is summarised."""
import csv
import os
import shutil
import stat
import subprocess
import sys

import pytest

from launch.slurm import DEFAULTS as SLURM_DEFAULTS
from launch.slurm import sbatch_array_script
from launch.sweep import build_sweep, load_sweep_file, main, parse_sweep, point_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(ROOT, "configs", "sweeps")


def test_names_say_what_differs():
    names = point_names([
        {"model.memory.n_keys": 512, "model.memory.layers": [4, 12, 20], "optim.lr": 0.01},
        {"model.memory.n_keys": 1024, "model.memory.layers": [12], "optim.lr": 0.01},
        {"model.memory.n_keys": 512, "model.memory.layers": [], "model.memory.every": 4, "optim.lr": 0.01},
    ])
    # optim.lr is the same everywhere: not in the names; lists read as a-b-c, an empty one as none
    assert names == ["n_keys=512,layers=4-12-20", "n_keys=1024,layers=12", "n_keys=512,layers=none,every=4"]
    # two keys with one last part: the shortest suffix that tells them apart
    assert point_names([{"optim.lr": 1, "eval.lr": 1}, {"optim.lr": 2, "eval.lr": 3}]) == [
        "optim.lr=1,eval.lr=1", "optim.lr=2,eval.lr=3"]
    # filesystem-safe: no slashes or spaces from string values
    assert point_names([{"data.path": "a/b c"}, {"data.path": "d"}]) == ["path=a_b_c", "path=d"]


def test_file_grid_points_and_command_line_axes_combine():
    spec = load_sweep_file(os.path.join(SWEEPS, "placement.yaml"))
    sweep = build_sweep(*parse_sweep(["sweep.optim.lr=[0.001,0.002]", "train.steps=7", "run_dir=/tmp/x"]), spec=spec)
    assert len(sweep.points) == 3 * 2 * 2
    assert sweep.name == "placement" and sweep.run_dir == "/tmp/x"
    first = sweep.points[0]
    assert first.name == "n_keys=512,lr=0.001,layers=12"
    assert first.args[0] == "config=configs/memory_373m.yaml"
    assert "train.steps=7" in first.args and "logging.group=placement" in first.args
    assert "model.memory.layers=[12]" in first.args and first.args[-1] == f"run_dir=/tmp/x/{first.name}"
    assert len({p.run_dir for p in sweep.points}) == len(sweep.points)
    # a command-line axis replaces the file's axis of the same key
    narrowed = build_sweep(*parse_sweep(["sweep.model.memory.n_keys=[64]"]), spec=spec)
    assert [p.name for p in narrowed.points] == ["layers=12", "layers=4-12-20", "layers=none,every=4,start=2"]
    assert all("model.memory.n_keys=64" in p.args for p in narrowed.points)
    assert narrowed.run_dir == os.path.join("runs", "sweeps", "placement")


def test_the_shipped_sweeps_validate(capsys):
    # every point of every shipped sweep file is a valid trainer config (checked without running anything)
    for name in ("memory_size", "placement", "cpu_demo"):
        assert main([f"sweep={os.path.join(SWEEPS, name + '.yaml')}", "--dry-run"]) == 0, name
    out = capsys.readouterr().out
    assert "sweep memory_size: 3 points" in out and "sweep placement: 6 points" in out
    assert "sweep cpu_demo: 4 points" in out


def test_a_bad_point_is_a_config_error_before_anything_is_written(tmp_path, capsys):
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(
        f"config: {ROOT}/configs/tiny.yaml\n"
        f"run_dir: {tmp_path}/runs\n"
        "points:\n  - {model.memory.knn: 8}\n  - {model.memory.knn: 1000}\n"
    )
    assert main([f"sweep={sweep_file}"]) == 2
    err = capsys.readouterr().err
    assert "config error: knn=1000: model.memory.knn:" in err and "knn=8" not in err
    assert not (tmp_path / "runs").exists()
    # a key the trainer does not have is caught the same way
    assert main([f"sweep={sweep_file}", "sweep.model.memory.n_key=[1,2]"]) == 2
    assert "model.memory.n_key" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_identical_points_are_refused(capsys):
    assert main(["sweep.optim.lr=[0.1,0.1]", "--dry-run"]) == 2
    assert "are the same" in capsys.readouterr().err


def _stub(path, body):
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_array_has_one_task_per_point(tmp_path):
    spec = load_sweep_file(os.path.join(SWEEPS, "cpu_demo.yaml"))
    sweep = build_sweep([], [f"run_dir={tmp_path}/sweep"], spec=spec)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    opts = dict(SLURM_DEFAULTS, nodes=1, gpus_per_node=2, python=str(bin_dir / "python"))
    script = sbatch_array_script([(p.name, p.args) for p in sweep.points], opts, sweep.run_dir)
    assert "#SBATCH --array=0-3\n" in script
    assert f"#SBATCH --output={tmp_path}/sweep/slurm-%A_%a.out" in script
    assert "#SBATCH --requeue" in script and "trap forward_usr1 USR1" in script and "scontrol requeue" in script
    tasks = [line for line in script.splitlines() if "POINT_CMD=" in line]
    assert len(tasks) == 4 and [t.split(")")[0].strip() for t in tasks] == ["0", "1", "2", "3"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # run the script for each array index with stand-ins for srun, scontrol and python: index i starts point i
    # (the stand-in python writes the arguments torchrun would get, after the shell's quoting)
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done; exec "$@"\n')
    _stub(bin_dir / "scontrol", "echo node0\n")
    _stub(bin_dir / "python", 'printf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (tmp_path / "script.sh").write_text(script)
    for i, point in enumerate(sweep.points):
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID=str(i),
                   SLURM_JOB_ID=str(100 + i), SLURM_JOB_NODELIST="node0", ARGS_OUT=str(tmp_path / f"args{i}"))
        subprocess.run(["bash", str(tmp_path / "script.sh")], env=env, check=True, timeout=30, capture_output=True)
        args = (tmp_path / f"args{i}").read_text().splitlines()
        assert args[:2] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in args
        assert args[args.index("train") + 1:] == point.args
    bad = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="4", SLURM_JOB_ID="1")
    assert subprocess.run(["bash", str(tmp_path / "script.sh")], env=bad, capture_output=True).returncode != 0


def test_slurm_dry_run_prints_the_array_and_writes_nothing(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.sweep", f"sweep={SWEEPS}/memory_size.yaml", "launcher=slurm",
         f"run_dir={tmp_path}/s", "--dry-run"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("#!/bin/bash") and "#SBATCH --array=0-2\n" in out.stdout
    assert "n_keys=1024" in out.stdout and not (tmp_path / "s").exists()


# The CPU demo made smaller still: 4 points of 4 steps on a model of width 32.
DEMO = [
    "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=16", "model.memory.k_dim=16",
    "model.memory.knn=4", "data.seq_len=16", "train.batch_size=2", "train.steps=4", "train.log_every=1",
    "train.val_batches=1", "checkpoint.every=2",
]


def _sweep(capfd, run_dir, *extra):
    """The sweep's main in this process (the trainers are subprocesses, as always); returns what was printed."""
    status = main([f"sweep={SWEEPS}/cpu_demo.yaml", f"run_dir={run_dir}", *DEMO, *extra])
    out = capfd.readouterr()
    assert status == 0, out.out + out.err
    return out.out


def _rows(run_dir):
    with open(os.path.join(run_dir, "summary.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_demo_sweep_runs_resumes_and_is_summarised(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep_dir = tmp_path / "demo"
    out = _sweep(capfd, sweep_dir)
    names = ["n_keys=16,layers=2", "n_keys=32,layers=2", "n_keys=16,layers=1-3", "n_keys=32,layers=1-3"]
    assert out.count(": starts") == 4, out
    assert all((sweep_dir / n / "summary.json").exists() for n in names)
    assert [r["point"] for r in _rows(sweep_dir)] == names

    # the third point died after its step-2 checkpoint: no summary, no final checkpoint
    hit = sweep_dir / names[2]
    os.remove(hit / "summary.json")
    shutil.rmtree(hit / "checkpoints" / "step_4")
    assert main([f"sweep={SWEEPS}/cpu_demo.yaml", f"run_dir={sweep_dir}", *DEMO, "summarize"]) == 0
    partial = {r["point"]: r for r in _rows(sweep_dir)}
    assert partial[names[2]]["status"].startswith("stopped at step") and partial[names[0]]["status"] == "finished"

    out = _sweep(capfd, sweep_dir)
    assert out.count("finished (4/4 steps): skipped") == 3, out
    assert f"{names[2]}: resumes from step 2/4" in out and "resumed from" in out and "at step 2" in out, out
    assert out.count(": starts") == 0
    rows = _rows(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    # config differences and final metrics
    assert {r["model.memory.n_keys"] for r in rows} == {"16", "32"}
    assert {r["model.memory.layers"] for r in rows} == {"[2]", "[1, 3]"}
    assert all(float(r["val/loss"]) > 0 and float(r["val/wiki_leads/bpb"]) > 0 for r in rows)
    assert all(int(r["tokens"]) == 4 * 2 * 16 and int(r["flops_per_token"]) > 0 for r in rows)
    pngs = [f for f in os.listdir(sweep_dir) if f.endswith(".png")]
    assert len(pngs) >= 2 and all(os.path.getsize(sweep_dir / f) > 1000 for f in pngs)
    assert "Lowest final validation loss" in (sweep_dir / "summary.md").read_text()
