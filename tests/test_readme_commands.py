"""Every command in README.md and eval/README.md works on a fresh clone: each ```bash line is parsed and checked
the way its program checks it before any compute (config, input files, parallel layout), the SLURM and sweep ones
are built with --dry-run (a sweep's summary is written for real), commands inside the Docker image are checked
like the same commands outside it, and the README's eval example runs against a small trained checkpoint. Paths under runs/ go to
a temporary directory."""
import json
import os
import re
import shlex
import subprocess

import pytest

from _train_helpers import RUN_SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "eval/README.md")
QA_STANDIN = "/data/qa_wikidata.jsonl"  # the placeholder path of the docs; a small stand-in file replaces it
# Checked elsewhere: the suite itself, and lm_eval's own command line (tests/test_eval_lm_eval_harness.py).
ELSEWHERE = ("make test", "python -m eval.lm_eval_adapter")


def commands(doc):
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


ALL = [(doc, words) for doc in DOCS for words in commands(doc)]


def _localize(words, tmp):
    return [w.replace("runs/", f"{tmp}/runs/").replace(QA_STANDIN, str(tmp / "qa.jsonl")) for w in words]


def _torchrun_world(words):
    nnodes, nproc, i = 1, 1, 0
    while words[i] != "-m":
        flag = words[i]
        if flag in ("--nnodes", "--nproc-per-node"):
            value = int(words[i + 1])
            nnodes, nproc = (value, nproc) if flag == "--nnodes" else (nnodes, value)
            i += 1
        i += 1
    return nnodes * nproc, words[i + 1], words[i + 2:]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A small trained run at runs/tiny and runs/x, synthetic facts at runs/synth, a stand-in qa file."""
    from eval.synthetic_facts import main as synth
    from train.config import parse_cli
    from train.loop import run

    tmp = tmp_path_factory.mktemp("readme")
    run(parse_cli(RUN_SMALL + ["train.steps=2", f"run_dir={tmp}/runs/tiny"]))
    os.symlink(tmp / "runs" / "tiny", tmp / "runs" / "x")
    assert synth(["--out", str(tmp / "runs" / "synth"), "--n-entities", "20"]) in (0, None)
    with open(tmp / "qa.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "The capital of France is", "answers": ["Paris"]}) + "\n")
    return tmp


def test_every_documented_command_is_covered():
    assert len(ALL) >= 8
    programs = {" ".join(w[:3]) if w[0] == "python" else w[0] for _, w in ALL}
    assert {"python -m train", "python -m eval", "torchrun", "python -m launch.slurm", "make"} <= programs


@pytest.mark.slow  # a short training run, then each command's checks in-process
@pytest.mark.parametrize("doc, words", ALL, ids=[f"{d}:{' '.join(w)[:60]}" for d, w in ALL])
def test_documented_command(fixtures, doc, words, capsys):
    from eval.__main__ import main as eval_main
    from eval.__main__ import parse_cli as eval_cli
    from eval.runner import load_eval_tasks
    from launch.common import trainer_config
    from launch.slurm import main as slurm_main
    from train.config import parse_cli
    from train.inputs import check_inputs

    line = " ".join(words)
    if line.startswith(ELSEWHERE):
        pytest.skip("checked by its own test")
    words = _localize(words, fixtures)
    if words[:2] == ["docker", "build"]:
        pytest.skip("the Dockerfile is checked by tests/test_dockerfile.py")
    if words[0] == "docker":  # `docker run [options] IMAGE command...`: check the command
        words = words[words.index("mnemo", 2) + 1:]
        if words[:3] == ["python", "-m", "torch.distributed.run"]:
            words = ["torchrun"] + words[4:]
    if words[:2] == ["make", "test"]:
        pytest.skip("checked by its own test")
    if words[0] == "make":  # the Makefile's recipe for it, checked like python -m train
        recipe = subprocess.run(["make", "-n", words[1]], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        train_line = [ln for ln in recipe.splitlines() if " -m train " in ln]
        assert train_line, recipe
        args = shlex.split(train_line[0].split(" -m train ", 1)[1])
        check_inputs(parse_cli(args))
    elif words[0] == "torchrun":
        world, module, args = _torchrun_world(words[1:])
        if module == "train":
            check_inputs(trainer_config(args, {}, world))
        else:
            load_eval_tasks(eval_cli(args))
    elif words[:3] == ["python", "-m", "train"]:
        check_inputs(parse_cli(words[3:]))
    elif words[:3] == ["python", "-m", "eval"]:
        cfg = eval_cli(words[3:])
        load_eval_tasks(cfg)
        if not cfg.tasks:  # the README's example: run it on the small checkpoint
            assert eval_main(words[3:]) == 0
            assert "val/loss" in capsys.readouterr().out
    elif words[:3] == ["python", "-m", "launch.slurm"]:
        assert slurm_main(words[3:] + ["--dry-run"]) == 0
        assert "#SBATCH --nodes=" in capsys.readouterr().out
    elif words[:3] == ["python", "-m", "launch.sweep"]:
        from launch.sweep import main as sweep_main

        args = words[3:] + [f"run_dir={fixtures}/runs/sweep"]  # dry runs write nothing; a summary goes here
        if "summarize" not in args and "--dry-run" not in args:
            args.append("--dry-run")
        assert sweep_main(args) == 0
    elif words[:3] == ["python", "-m", "eval.synthetic_facts"]:
        from eval.synthetic_facts import main as synth

        out = fixtures / "synth_doc"
        assert synth([*(w if not w.endswith("runs/synth") else str(out) for w in words[3:]), "--n-entities", "20"]) \
            in (0, None)
        assert (out / "qa.jsonl").exists()
    else:
        pytest.fail(f"{doc}: no check for the documented command {line!r}; add one here")
