"""Knowledge-update finetuning data: with replay, the pretraining mixture gets the asked share of the tokens."""
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import load_tokenizer  # noqa: E402
from data.config import resolve_path  # noqa: E402
from eval.synthetic_facts import generate  # noqa: E402
from scripts.facts_experiment import mean_tokens  # noqa: E402
from scripts.knowledge_update import finetune_data  # noqa: E402


def test_replay_share_is_the_share_of_tokens(tmp_path):
    tok = load_tokenizer(os.path.join(ROOT, "data", "corpus", "tokenizer.model"))
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    generate(old, 8, 0, 2, 0.5)
    generate(new, 4, 1000, 2, 0.5)
    new_train = os.path.join(new, "train.jsonl")
    assert finetune_data(new_train, old, 0.0, tok) == f"data.train=[{{paths: [{new_train}]}}]"
    spec = finetune_data(new_train, old, 0.3, tok)
    pairs = re.findall(r"paths: \[([^\]]+)\], weight: ([0-9.]+)", spec)
    assert len(pairs) == 3
    tokens = {p: float(w) * mean_tokens(resolve_path(p), tok) for p, w in pairs}
    total = sum(tokens.values())
    assert abs(tokens[new_train] / total - 0.7) < 0.01
    assert abs(tokens[os.path.join(old, "train.jsonl")] / total - 0.15) < 0.01


@pytest.mark.slow
def test_parallel_finetuning_stops_at_a_failed_run_and_shows_its_log(tmp_path):
    from scripts.knowledge_update import run_at_once

    config = os.path.join(ROOT, "configs", "facts_small.yaml")
    jobs = [(mode, str(tmp_path / mode), [f"run_dir={tmp_path / mode}", "model.no_such_key=1"])
            for mode in ("memory", "ffn")]
    with pytest.raises(SystemExit, match=r"(?s)finetune (memory|ffn): exit [1-9].*no_such_key"):
        list(run_at_once(config, jobs, parallel=2))


def test_eval_tasks_are_copies_named_by_set_outside_the_facts_dirs(tmp_path):
    from scripts.knowledge_update import tasks_override

    old, new, copies = tmp_path / "old", tmp_path / "new", tmp_path / "tasks"
    generate(str(old), 6, 0, 2, 0.5)
    generate(str(new), 4, 1000, 2, 0.5)
    copies.mkdir()
    before = sorted(os.listdir(old))
    spec = tasks_override({"old": str(old), "new": str(new)}, str(copies))
    names = ["old_qa_trained", "old_qa_prose", "new_qa_trained", "new_qa_prose"]
    assert spec == "eval.tasks=[" + ",".join(f"jsonl:{copies / n}.jsonl" for n in names) + "]"
    assert (copies / "new_qa_prose.jsonl").read_text() == (new / "qa_prose.jsonl").read_text()
    assert sorted(os.listdir(old)) == before  # a facts sweep's data directory stays as it was
