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


SEEDED = """
datasets: {p1: {entities: 10}}
runs:
  - {name: mem, data: p1, seeds: [0, 2], overrides: [model.memory.n_keys=64]}
  - {name: dense, data: p1, dense_of: mem, seeds: [0, 2]}
  - {name: other, data: p1}
"""


def test_seeds_expand_to_one_run_per_seed_paired_with_the_same_seed_twin(tmp_path):
    runs = load_sweep(_write(tmp_path, SEEDED))["runs"]
    assert [(r["name"], r["group"], r.get("dense_of")) for r in runs] == [
        ("mem_s0", "mem", None), ("mem_s2", "mem", None), ("dense_s0", "dense", "mem_s0"),
        ("dense_s2", "dense", "mem_s2"), ("other", "other", None)]
    assert runs[1]["overrides"] == ["model.memory.n_keys=64", "train.seed=2", "data.seed=2"]
    assert runs[3]["overrides"] == ["train.seed=2", "data.seed=2"]


@pytest.mark.parametrize("text, named", [
    (SEEDED.replace("dense_of: mem, seeds: [0, 2]", "dense_of: mem, seeds: [0, 1]"), "list the same seeds"),
    (SEEDED.replace("dense_of: mem, seeds: [0, 2]", "dense_of: mem"), "list the same seeds"),
    (SEEDED.replace("seeds: [0, 2], overrides", "seeds: [], overrides"), "seeds must be"),
    (SEEDED.replace("seeds: [0, 2], overrides", "seeds: [1, 1], overrides"), "seeds must be"),
    (SEEDED.replace("name: other", "name: mem_s0"), r"run names \['mem_s0'\] used twice"),
])
def test_bad_seeds_are_refused(tmp_path, text, named):
    with pytest.raises(SweepFileError, match="sweep.yaml.*" + named):
        load_sweep(_write(tmp_path, text))


def test_seed_groups_give_mean_and_spread():
    from scripts.facts_sweep import seed_groups, seed_table

    rows = [{"run": "m_s0", "group": "m", "qa_trained/em": 0.9, "val_loss": 3.0, "flops_per_token": 5},
            {"run": "m_s1", "group": "m", "qa_trained/em": 0.7, "val_loss": 3.2, "flops_per_token": 5},
            {"run": "m_s2", "group": "m", "qa_trained/em": 0.8, "flops_per_token": 5},  # stopped before validating
            {"run": "alone", "group": "alone", "qa_trained/em": 0.1}]
    (g,) = seed_groups(rows)
    assert g["group"] == "m" and g["runs"] == ["m_s0", "m_s1", "m_s2"] and "qa_prose/em" not in g
    assert g["qa_trained/em"]["mean"] == pytest.approx(0.8) and g["qa_trained/em"]["std"] == pytest.approx(0.1)
    assert (g["qa_trained/em"]["min"], g["qa_trained/em"]["max"], g["val_loss"]["n"]) == (0.7, 0.9, 2)
    assert "| m | 0.000M | 0.800 ± 0.100 (0.700–0.900, n=3) | - | 3.1000 ± 0.1414" in seed_table([g])


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
    assert lines == {"p1 L2 d64: memory in place of the FFN of layer 1": [(16384, 0.3, 0.0), (65536, 0.5, 0.0)],
                     "p1 L2 d64: memory in place of the FFN of layer 0": [(65536, 0.2, 0.0)]}


def test_placement_lines_average_seeds_and_keep_beside_apart():
    from scripts.facts_plots import dense_levels, placement_lines

    def row(run, group, values, a, keep_ffn=False):
        return {"run": run, "group": group, "data": "p1", "dim": 64, "n_layers": 2, "memory_layers": [1],
                "memory_values": values, "keep_ffn": keep_ffn, "qa_trained/em": a, "qa_prose/em": a / 10}

    rows = [row("m_s0", "m", 4096, 0.6), row("m_s1", "m", 4096, 0.8), row("m_vlr1", "m_vlr1", 4096, 0.1),
            row("b", "b", 4096, 0.3, keep_ffn=True), row("b_k32", "b_k32", 1024, 0.2, keep_ffn=True),
            {**row("d_s0", "d", 0, 0.2), "memory_layers": []}, {**row("d_s1", "d", 0, 0.4), "memory_layers": []}]
    lines = placement_lines(rows)
    assert set(lines) == {"p1 L2 d64: memory in place of the FFN of layer 1", "p1 L2 d64: memory beside the FFN of layer 1"}
    ((size, a, b),) = lines["p1 L2 d64: memory in place of the FFN of layer 1"]
    assert size == 4096 and a == pytest.approx(0.7) and b == pytest.approx(0.07)
    assert [p[0] for p in lines["p1 L2 d64: memory beside the FFN of layer 1"]] == [1024, 4096]
    ((group, (a, b, n)),) = dense_levels(rows).items()
    assert group == "d" and a == pytest.approx(0.3) and n == 2


def test_guess_em_is_the_most_common_value_rate(tmp_path):
    from scripts.facts_sweep import guess_em

    rows = [("city", "A"), ("city", "A"), ("city", "B"), ("year", "1"), ("year", "2"), ("year", "2"), ("city", "A")]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"attribute": a, "answers": [v]}) + "\n" for a, v in rows))
    assert guess_em(str(path), 0) == pytest.approx(5 / 7)
    assert guess_em(str(path), 3) == pytest.approx(2 / 3)  # the first 3, with the whole file's most common values


def test_the_final_sweep_has_seeded_pairs_and_three_sizes_per_placement():
    from scripts.facts_experiment import matched_dense
    from train.config import load_config

    spec = load_sweep(os.path.join(ROOT, "configs", "sweeps", "facts_final.yaml"))
    assert len(spec["runs"]) == 14
    config = os.path.join(ROOT, spec["config"])
    cfgs, sizes = {}, {}
    for r in spec["runs"]:
        ov = spec["overrides"] + list(r.get("overrides") or [])
        if r.get("dense_of"):
            twin = cfgs[r["dense_of"]]
            ov += matched_dense(twin)
        cfg = cfgs[r["name"]] = load_config(config, ov)  # validates every run's config
        m = cfg.model.memory
        if m.layers:
            sizes.setdefault((tuple(m.layers), m.keep_ffn), set()).add(m.n_keys)
    assert sizes == {((2,), False): {128, 256, 512}, ((1,), False): {128, 256, 512}, ((2,), True): {128, 256, 512}}
    seeds = {(n, cfgs[n].train.seed, cfgs[n].data.seed) for n in ("mem_s0", "mem_s1", "mem_s2", "dense_s2")}
    assert seeds == {("mem_s0", 0, 0), ("mem_s1", 1, 1), ("mem_s2", 2, 2), ("dense_s2", 2, 2)}
    assert cfgs["mem_s0"].checkpoint.save_final and not cfgs["dense_s0"].model.memory.layers


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs", "sweeps"))
                                        if f.startswith("facts_")))
def test_every_facts_sweep_file_validates(name):
    """Every run of every shipped facts sweep is a valid config (a typo fails here, not minutes into a GPU call);
    a dense twin gets at least its memory run's FLOPs per token."""
    from model.flops import flops_per_token
    from scripts.facts_experiment import matched_dense
    from train.config import load_config

    spec = load_sweep(os.path.join(ROOT, "configs", "sweeps", name))
    config = os.path.join(ROOT, spec["config"])
    cfgs, own = {}, {}
    for r in spec["runs"]:  # as facts_sweep builds them: a twin starts from its memory run's overrides
        if r.get("dense_of"):
            ov = own[r["dense_of"]] + list(r.get("overrides") or [])
            ov += matched_dense(load_config(config, ov))
        else:
            ov = spec["overrides"] + list(r.get("overrides") or [])
        own[r["name"]] = ov
        cfg = cfgs[r["name"]] = load_config(config, ov)
        if r.get("dense_of"):
            twin = cfgs[r["dense_of"]]
            assert not cfg.model.memory.layers
            assert (flops_per_token(cfg.model, cfg.data.seq_len).total
                    >= flops_per_token(twin.model, twin.data.seq_len).total)
