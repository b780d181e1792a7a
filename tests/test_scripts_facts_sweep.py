"""The facts sweep runner: its sweep file is checked before anything runs, a run's results are read from its
metrics even when it was stopped mid-line, and runs past the budget are stopped."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.facts_sweep import SweepFileError, load_sweep, read_run, stop  # noqa: E402

GOOD = """
datasets: {p1: {entities: 10}}
runs:
  - {name: mem, data: p1}
  - {name: dense, data: p1, dense_of: mem}
"""


def _write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


def test_good_sweep_loads_with_defaults(tmp_path):
    spec = load_sweep(_write(tmp_path, GOOD))
    assert spec["config"] == "configs/facts_small.yaml"
    assert [r["name"] for r in spec["runs"]] == ["mem", "dense"]


@pytest.mark.parametrize("text, named", [
    (GOOD.replace("data: p1, dense_of", "data: p2, dense_of"), "data 'p2'"),
    (GOOD.replace("dense_of: mem", "dense_of: other"), "dense_of 'other'"),
    (GOOD.replace("name: dense", "name: mem"), "name 'mem' used twice"),
    (GOOD.replace("entities: 10", "people: 10"), "datasets.p1"),
    (GOOD + "grid: {}\n", "unknown keys ['grid']"),
    ("datasets: {p1: {entities: 10}}\n", "needs `datasets` and `runs`"),
])
def test_bad_sweep_is_refused_naming_the_problem(tmp_path, text, named):
    with pytest.raises(SweepFileError, match="sweep.yaml.*" + named.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(_write(tmp_path, text))


def test_read_run_takes_the_last_eval_and_skips_a_cut_line(tmp_path):
    recs = [{"step": 0, "params": 10, "flops_per_token": 123},
            {"step": 100, "loss": 3.0, "tokens_per_s": 50.0, "memory/1/rows_read": 0.5},
            {"step": 100, "val/loss": 2.5, "eval/qa_trained/em": 0.1, "eval/qa_trained/answer_nll": 4.0,
             "eval/qa_prose/em": 0.0, "eval/qa_prose/answer_nll": 9.0},
            {"step": 200, "loss": 2.0, "tokens_per_s": 60.0, "memory/1/rows_read": 0.7},
            {"step": 200, "val/loss": 2.2, "eval/qa_trained/em": 0.3, "eval/qa_trained/answer_nll": 2.0,
             "eval/qa_prose/em": 0.05, "eval/qa_prose/answer_nll": 8.0}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
        f.write('{"step": 300, "loss": 1.')  # killed while writing
    res = read_run(str(tmp_path))
    assert res["step"] == 200 and res["eval_step"] == 200 and not res["finished"]
    assert (res["qa_trained/em"], res["qa_prose/em"], res["val_loss"]) == (0.3, 0.05, 2.2)
    assert res["tokens_per_s"] == 60.0 and res["memory/1/rows_read"] == 0.7 and res["flops_per_token"] == 123
    assert [e["step"] for e in res["evals"]] == [100, 200]


def test_stop_ends_a_run_and_its_children(tmp_path):
    # the "run" starts a child of its own; both must be gone after stop()
    child_pid = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(child_pid)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    for _ in range(100):
        if child_pid.exists() and child_pid.read_text():
            break
        time.sleep(0.05)
    child = int(child_pid.read_text())
    t0 = time.time()
    stop({"run": p}, grace_s=10)
    assert p.poll() is not None and time.time() - t0 < 10
    assert _gone(child)


def _gone(pid, wait_s=5.0):
    """The process no longer runs (absent, or a zombie waiting for its reaper)."""
    end = time.time() + wait_s
    while time.time() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_placement_lines_group_by_placement_and_keep_the_plain_point():
    from scripts.facts_plots import placement_lines

    def row(run, values, layers, a, b=0.0):
        return {"run": run, "data": "p1", "dim": 64, "n_layers": 2, "memory_layers": layers,
                "memory_values": values, "qa_trained/em": a, "qa_prose/em": b}

    rows = [row("m", 65536, [1], 0.5), row("m_k128", 16384, [1], 0.3), row("m_vlr1", 65536, [1], 0.9),
            row("m_l0", 65536, [0], 0.2), row("dense", 0, [], 0.1), {"run": "crashed", "memory_values": 4096}]
    lines = placement_lines(rows)
    assert lines == {"p1 L2 d64, memory at 1": [(16384, 0.3, 0.0), (65536, 0.5, 0.0)],
                     "p1 L2 d64, memory at 0": [(65536, 0.2, 0.0)]}


def test_guess_em_is_the_most_common_value_rate(tmp_path):
    from scripts.facts_sweep import guess_em

    rows = [("city", "A"), ("city", "A"), ("city", "B"), ("year", "1"), ("year", "2"), ("year", "2"), ("city", "A")]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"attribute": a, "answers": [v]}) + "\n" for a, v in rows))
    assert guess_em(str(path), 0) == pytest.approx(5 / 7)
    assert guess_em(str(path), 3) == pytest.approx(2 / 3)  # the first 3, with the whole file's most common values
