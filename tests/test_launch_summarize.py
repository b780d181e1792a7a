"""The summary of a set of runs, on run directories written by hand (no training): config differences, final
metrics, status of unfinished runs, the best point, plots."""
import csv
import json
import os

import pytest

from launch.summarize import PLOTS, find_runs, load_run, main, table


def _write_run(path, n_keys, layers, losses, val=None, steps=4, finished=True, extra=None):
    os.makedirs(path)
    (path / "config.yaml").write_text(
        f"run_dir: {path}\nmodel:\n  n_layers: 4\n  memory:\n    layers: {layers}\n    every: null\n    start: 0\n"
        f"    n_keys: {n_keys}\ntrain:\n  steps: {steps}\n  seed: 0\nlogging:\n  group: g\n"
    )
    recs = [{"step": 0, "params": 1000 * n_keys, "flops_per_token": 600}]
    for i, loss in enumerate(losses, 1):
        recs.append({"step": i, "loss": loss, "tokens": 32 * i, "tokens_per_s": 100.0 * i, "mfu": 0.1 * i,
                     **(extra or {})})
    if val is not None:
        recs.append({"step": len(losses), "val/loss": val, "val/bpb": val / 2, "val/wiki/loss": val,
                     "eval/qa/exact_match": 0.25})
    with open(path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
        f.write('{"step": 9, "loss": 1.')  # a line cut by a crash mid-write is skipped
    if finished:
        (path / "summary.json").write_text(json.dumps({"step": steps, "val_loss": val}))


def test_table_plots_and_partial_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _write_run(sweep / "a", 16, [2], [5.0, 4.0, 3.5, 3.0], val=3.2)
    _write_run(sweep / "b", 32, [2], [5.0, 3.9, 3.3, 2.9], val=3.0)
    _write_run(sweep / "c", 16, [1, 3], [5.0, 4.1], steps=4, finished=False)
    main([str(sweep)])
    out = capsys.readouterr().out
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["point"] for r in rows] == ["a", "b", "c"]
    # only the keys that differ are config columns (run_dir and the wandb group differ or not: never shown)
    header = list(rows[0])
    assert "model.memory.n_keys" in header and "model.memory.layers" in header
    assert "train.steps" not in header and "run_dir" not in header and "logging.group" not in header
    assert [r["status"] for r in rows] == ["finished", "finished", "stopped at step 2/4"]
    assert rows[1]["val/loss"] == "3.0" and rows[1]["val/wiki/loss"] == "3.0" and rows[1]["eval/qa/exact_match"] == "0.25"
    assert rows[2]["val/loss"] == ""  # no validation yet
    # speeds: the median over logged steps after the first (warm-up) one
    assert float(rows[0]["tokens_per_s"]) == 300.0 and float(rows[0]["mfu"]) == pytest.approx(0.3)
    assert rows[0]["tokens"] == "128" and rows[0]["train_flops"] == str(128 * 600) and rows[0]["params"] == "16000"
    md = (sweep / "summary.md").read_text()
    assert md.count("\n| ") == 3 and "Lowest final validation loss: **b** (3.0000)" in md and md in out
    assert all((sweep / p).stat().st_size > 1000 for p in PLOTS)


def test_memory_size_plot_has_a_line_per_placement(tmp_path, monkeypatch):
    import matplotlib.axes

    plotted = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, *a, **k: plotted.append((k.get("label"), list(x), list(y))) or
                        real_plot(self, x, y, *a, **k))
    for name, n_keys, layers, val in (("a", 16, [2], 3.2), ("b", 32, [2], 3.0), ("c", 16, [1, 3], 3.1),
                                      ("d", 32, [1, 3], 2.8)):
        _write_run(tmp_path / name, n_keys, layers, [4.0, 3.0], val=val, steps=2)
    main([str(tmp_path)])
    lines = {}
    for label, x, y in plotted:
        lines.setdefault(label, []).append((x, y))
    assert lines["layers 2"] == [([256, 1024], [3.2, 3.0])]  # memory slots n_keys^2
    assert lines["layers 1,3"] == [([256, 1024], [3.1, 2.8])]
    # loss curves against tokens, then against training FLOPs (600 per token)
    assert lines["d"] == [([32, 64], [4.0, 3.0]), ([32 * 600, 64 * 600], [4.0, 3.0])]


def test_a_folder_without_runs_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="neither a run directory"):
        find_runs([str(tmp_path)])


def test_not_started_point_shows_its_planned_values(tmp_path):
    _write_run(tmp_path / "a", 16, [2], [4.0], val=3.0, steps=1)
    runs = [load_run(str(tmp_path / "a")), load_run(str(tmp_path / "b"), planned={"model.memory.n_keys": 32})]
    header, rows = table(runs)
    assert rows[1][:2] == ["b", "not started"]
    assert rows[1][header.index("model.memory.n_keys")] == 32
