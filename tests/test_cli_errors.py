"""Every command line answers bad input with one `config error: <key>: ...` line (exit status 2) and --help with
usage (exit status 0), never a traceback; launchers check the trainer's config before writing or starting."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(module):
    if module == "train":
        from train.__main__ import main
    elif module == "eval":
        from eval.__main__ import main
    else:
        main = __import__(f"launch.{module}", fromlist=["main"]).main
    return main


def _one_config_error(capsys, module, argv):
    assert _main(module)(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: "), err
    return err[0][len("config error: "):]


@pytest.mark.parametrize("argv, key", [
    (["data.train=[{paths:[x.jsonl]}]"], "data.train: cannot parse the value"),
    (["optim.betas=[0.9,"], "optim.betas: cannot parse the value"),
    (["config=nope/missing.yaml"], "config: file not found: nope/missing.yaml"),
    (["data.train=[{paths: [/nonexistent/x.jsonl]}]"], "data.train[0]: path '/nonexistent/x.jsonl' does not exist"),
    (["data.tokenizer=/nonexistent/t.model"], "data.tokenizer: no such file"),
    (["data.tokenizer=configs/tiny.yaml"], "data.tokenizer: cannot load"),
    (["eval.tasks=[qa_wikidata]"], "eval.qa_wikidata_path: the qa_wikidata task needs the path"),
    (["--", "train.steps"], "--: arguments are key=value"),
    (["model.attention_backend=flash4"], "model.attention_backend: flash4 cannot run here: it runs on CUDA GPUs only"),
])
def test_train_cli_errors_name_the_key(capsys, tmp_path, argv, key):
    # train.steps=1: should the check be missing, the test ends soon instead of training the tiny preset
    assert _one_config_error(capsys, "train", argv + ["train.steps=1", f"run_dir={tmp_path}/r"]).startswith(key)
    assert not (tmp_path / "r").exists()  # nothing written before the check


def test_eval_cli_errors_name_the_key(capsys):
    assert _one_config_error(capsys, "eval", ["checkpoint=x", "tasks=[a,{b:[c]}]"]).startswith("tasks: cannot parse")
    assert _one_config_error(capsys, "eval", ["checkpoint=x", "tasks=[qa_wikidata]"]).startswith(
        "qa_wikidata_path: the qa_wikidata task needs the path")
    assert _one_config_error(capsys, "eval", ["checkpoint=x", "tasks=[val_nll]"]).startswith(
        "tasks[0]: unknown task 'val_nll'")


@pytest.mark.parametrize("module", ["train", "eval"])
def test_an_old_omegaconf_is_named_with_the_version_to_install(capsys, tmp_path, monkeypatch, module):
    # OmegaConf 2.3 fails on the schemas' first Literal field ("Unexpected type annotation"), naming no package
    import omegaconf

    monkeypatch.setattr(omegaconf, "__version__", "2.3.0")
    argv = [f"run_dir={tmp_path}/r", "train.steps=1"] if module == "train" else ["checkpoint=x", "tasks=[qa]"]
    msg = _one_config_error(capsys, module, argv)
    assert msg.startswith("config: mnemo needs omegaconf >= 2.4") and "omegaconf 2.3.0" in msg, msg
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(omegaconf, "__version__", "2.4.0.dev3")
    from model.cli_config import require_omegaconf

    require_omegaconf()  # a 2.4 pre-release is new enough


@pytest.mark.parametrize("module, argv, key", [
    ("torchrun", ["nodes=0"], "nodes: must be >= 1, got 0"),
    ("torchrun", ["gpus_per_node=two"], "gpus_per_node: expected int"),
    ("torchrun", ["gpus_per_node=3", "dist.memory_parallel=2"], "dist.memory_parallel: 2 does not divide"),
    ("slurm", ["gpus_per_nod=8"], "gpus_per_nod: Key 'gpus_per_nod' not in 'TrainConfig' (neither a trainer key nor a "
                                  "launcher option"),
    ("slurm", ["nodes=2", "model.dimm=8"], "model.dimm: Key 'dimm'"),
    ("sweep", ["sweep.optim.lr=[1e-3"], "sweep.optim.lr: cannot parse the value"),
    ("sweep", ["train.steps=2"], "no sweep points"),
    ("sweep", ["launcher=k8s", "sweep.optim.lr=[1]"], "launcher: must be one of"),
])
def test_launcher_errors_name_the_key(capsys, tmp_path, module, argv, key):
    assert _one_config_error(capsys, module, argv + [f"run_dir={tmp_path}/r"]).startswith(key)
    assert not (tmp_path / "r").exists()


def test_slurm_writes_and_submits_nothing_for_a_bad_config(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    msg = _one_config_error(capsys, "slurm", ["nodes=2", "optim.lr=-1", f"run_dir={tmp_path}/r"])
    assert msg.startswith("optim.lr: must be > 0") and not calls and not (tmp_path / "r").exists()


def test_sweep_checks_every_point_before_starting_any(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    msg = _one_config_error(capsys, "sweep", ["sweep.optim.lr=[1e-3,-1]", "train.steps=2", f"run_dir={tmp_path}/r"])
    assert msg.startswith("lr=-1: optim.lr: must be > 0, got -1.0")
    assert calls == []  # the good first point did not train
    assert _main("sweep")(["sweep.optim.lr=[1e-3,2e-3]", "train.steps=2", f"run_dir={tmp_path}/r", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("-m train ") == 2 and calls == []  # both good points would start


@pytest.mark.parametrize("module, words", [
    ("train", ["python -m train", "train.steps=1000", "model.memory.n_keys=64"]),
    ("eval", ["python -m eval", "checkpoint=''", "qa_wikidata_path=''"]),
    ("torchrun", ["python -m launch.torchrun", "gpus_per_node=1"]),
    ("slurm", ["python -m launch.slurm", "time='24:00:00'"]),
    ("sweep", ["python -m launch.sweep", "launcher='local'"]),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage(capsys, tmp_path, monkeypatch, module, words, flag):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("--help started a process"))
    assert _main(module)([flag]) == 0
    out = capsys.readouterr()
    assert all(w in out.out for w in words) and out.err == ""
    assert os.listdir(tmp_path) == []  # launch.slurm --help used to write an sbatch script


def test_train_help_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0 and "usage" not in proc.stderr and "run_dir='runs/tiny'" in proc.stdout


def test_train_without_config_is_the_tiny_preset():
    from train.config import load_config, parse_cli

    assert parse_cli([]) == load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    assert parse_cli(["train.steps=3"]).model.dim == 128 and parse_cli(["train.steps=3"]).train.steps == 3


def test_config_path_resolves_from_the_repo_root(tmp_path, monkeypatch):
    from train.config import parse_cli

    monkeypatch.chdir(tmp_path)
    assert parse_cli(["config=configs/tiny.yaml"]).run_dir == "runs/tiny"
