import json
import os

import pytest

from eval.fewshot import build_prompt, shot_indices
from eval.metrics import choice_correct, choice_correct_norm, exact_match, normalize_answer, token_f1
from data.config import resolve_path
from eval.tasks import Example, load_jsonl_task, load_tasks
from eval.config import EvalConfig
from eval.results import flatten, format_table
from eval.sinks import write_jsonl
from eval.text import encode_request, trim_at_stop


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # "the" only as a word


def test_exact_match_best_over_answers():
    assert exact_match("the Toulouse.", ["Paris", "toulouse"]) == 1.0
    assert exact_match("Toulouse city", ["Toulouse"]) == 0.0
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_token_f1_known_values():
    # pred {new, york, city} vs gold {new, york}: P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("New York City", ["New York"]) == pytest.approx(0.8)
    assert token_f1("New York City", ["Boston", "York"]) == pytest.approx(0.5)  # best: P=1/3, R=1
    assert token_f1("Boston", ["New York"]) == 0.0
    assert token_f1("a a b", ["a b b"]) == pytest.approx(2 / 3)  # "a" is an article and is dropped: {b} vs {b, b}
    assert token_f1("the", ["an"]) == 1.0  # both normalise to nothing


def test_multiple_choice_accuracy():
    assert choice_correct([-3.0, -1.0, -2.0], 1) == 1.0
    assert choice_correct([-1.0, -1.0], 1) == 0.0  # ties go to the lower index
    # raw: choice 0 wins; per byte: -4/8 = -0.5 beats -3/2 = -1.5, so choice 1 wins
    assert choice_correct_norm([-3.0, -4.0], ["ab", "abcdefgh"], 1) == 1.0
    assert choice_correct([-3.0, -4.0], 1) == 0.0


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_load_tasks_and_errors(tmp_path):
    gen = _write(tmp_path, "g.jsonl", [{"prompt": "a", "answers": ["b"], "id": 3}, {"prompt": "c", "answers": ["d", "e"]}])
    t = load_jsonl_task(gen)
    assert t.kind == "generative" and t.name == "g" and t.examples[1].answers == ["d", "e"] and t.examples[0].meta == {"id": 3}
    mc = _write(tmp_path, "m.jsonl", [{"prompt": "a", "choices": ["x", "y"], "label": 1}])
    assert load_jsonl_task(mc).kind == "multiple_choice"
    bad = _write(tmp_path, "bad.jsonl", [{"prompt": "a", "answers": ["b"]}, {"prompt": "a", "choices": ["x", "y"], "label": 2}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*label"):
        load_jsonl_task(bad)
    mixed = _write(tmp_path, "mixed.jsonl", [{"prompt": "a", "answers": ["b"]}, {"prompt": "a", "choices": ["x", "y"], "label": 0}])
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: .*one format"):
        load_jsonl_task(mixed)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answers": ["b"]}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: invalid JSON"):
        load_jsonl_task(str(tmp_path / "broken.jsonl"))
    assert len(load_jsonl_task(gen, max_examples=1).examples) == 1
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_tasks("qa_wikidata", missing)


# Where developers and CI keep the evaluation-only qa_wikidata file (beside the repository, not in it).
SHARED_QA = "../shared/data/qa_wikidata.jsonl"


def test_qa_wikidata_loads_from_an_explicit_path():
    if not os.path.isfile(resolve_path(SHARED_QA)):
        pytest.skip("no shared/ data directory beside the repo (it is there for developers and CI)")
    tasks = load_tasks("qa_wikidata", SHARED_QA, max_examples=5)
    if not tasks:
        pytest.fail("no task")
    assert tasks[0].name == "qa_wikidata" and len(tasks[0].examples) == 5 and tasks[0].examples[0].answers


def test_qa_wikidata_needs_a_path():
    # the file is not part of the repository: no default that points outside it, a clear error instead
    assert EvalConfig().qa_wikidata_path == ""
    with pytest.raises(ValueError, match=r"^eval\.qa_wikidata_path: the qa_wikidata task needs the path"):
        EvalConfig(tasks=["qa_wikidata"]).validate("eval")
    with pytest.raises(ValueError, match=r"^qa_wikidata_path: the qa_wikidata task needs the path"):
        load_tasks("qa_wikidata", "")


def test_eval_config_validate():
    EvalConfig(tasks=["qa_wikidata", "synthetic:/x", "jsonl:a.jsonl"], qa_wikidata_path="qa.jsonl").validate("eval")
    with pytest.raises(ValueError, match=r"^eval\.tasks\[1\]: unknown task 'squad'"):
        EvalConfig(tasks=["qa_wikidata", "squad"]).validate("eval")
    with pytest.raises(ValueError, match=r"^eval\.batch_size:"):
        EvalConfig(batch_size=0).validate("eval")
    with pytest.raises(ValueError, match=r"^eval\.top_p:"):
        EvalConfig(top_p=0.0).validate("eval")
    with pytest.raises(ValueError, match=r"^eval\.every:"):
        EvalConfig(every=-1).validate("eval")


def test_fewshot_never_uses_the_example_and_is_deterministic():
    exs = [Example(prompt=f"Q{i}", answers=[f"A{i}"]) for i in range(6)]
    for i in range(6):
        idx = shot_indices(6, i, 5, seed=1)
        assert i not in idx and len(set(idx)) == 5
    p1 = build_prompt(exs, 2, 3, seed=7)
    assert p1 == build_prompt(exs, 2, 3, seed=7)
    lines = p1.split("\n")
    assert len(lines) == 4 and lines[-1] == "Q2" and all("Q2" not in l for l in lines[:-1])
    assert all(l == f"Q{l[1]} A{l[1]}" for l in lines[:-1])
    assert build_prompt(exs, 2, 0, seed=7) == "Q2"
    assert {build_prompt(exs, 2, 2, seed=s) for s in range(10)} != {p1}  # seed matters
    with pytest.raises(ValueError, match="num_fewshot"):
        shot_indices(3, 0, 3, seed=0)


def test_encode_request_and_stop(tmp_path):
    from data import load_tokenizer

    tok = load_tokenizer("byte")
    ctx, cont = encode_request(tok, "The capital is ", "Paris")
    assert ctx == [tok.bos_id] + list(b"The capital is") and cont == list(b" Paris")
    ctx, cont = encode_request(tok, "", "Hi")
    assert ctx == [tok.bos_id] and cont == list(b"Hi")
    assert trim_at_stop("Paris\nQ: x", ["\n", "Q:"]) == ("Paris", True)
    assert trim_at_stop("Paris", ["\n"]) == ("Paris", False)


def test_result_writers(tmp_path):
    res = {"qa": {"n": 3, "em": 0.5, "f1": 0.75}, "mc": {"n": 2, "acc": 1.0}}
    table = format_table(res)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "n", "em", "f1", "acc"] and lines[2].split() == ["qa", "3", "0.5000", "0.7500", "-"]
    assert flatten(res)["eval/qa/f1"] == 0.75
    p = tmp_path / "sub" / "r.jsonl"
    write_jsonl(str(p), [{"a": 1}])
    write_jsonl(str(p), [{"a": 2}])
    assert [json.loads(l)["a"] for l in p.read_text().splitlines()] == [1, 2]
