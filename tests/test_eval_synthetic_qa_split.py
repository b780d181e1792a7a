"""Synthetic facts with QA training documents for some people: trained pairs vs people seen only in prose."""
import json

import pytest

from eval.synthetic_facts import QA_TEMPLATES, QA_TRAIN_TEMPLATES, TRAIN_TEMPLATES, generate


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_qa_fraction_splits_people_into_trained_and_prose_only(tmp_path):
    plain, split = tmp_path / "plain", tmp_path / "split"
    generate(str(plain), 20, 1)
    counts = generate(str(split), 20, 1, qa_fraction=0.5)
    assert counts["qa_trained"] == counts["qa_prose"] == 50
    for f in ("qa.jsonl", "mc.jsonl", "val.jsonl"):  # the other files do not change
        assert (plain / f).read_bytes() == (split / f).read_bytes()
    assert not (plain / "qa_trained.jsonl").exists()
    texts = [d["text"] for d in read(split / "train.jsonl")]
    assert len(texts) == 60 + 10 * 5 * 2  # 3 biographies each + 2 wordings x 5 attributes for 10 people
    trained, prose = read(split / "qa_trained.jsonl"), read(split / "qa_prose.jsonl")
    assert not {q["entity"] for q in trained} & {q["entity"] for q in prose}
    docs = set(texts)
    for q in trained:  # the pair itself was a training document
        assert f"{q['prompt']} {q['answers'][0]}" in docs
    everything = " ".join(texts)
    for q in prose:
        assert q["prompt"] in [t.format(n=q["entity"]) for t in QA_TEMPLATES[q["attribute"]]]
        assert q["prompt"] not in everything  # held-out wording, never trained
        assert not any(t.format(n=q["entity"]) in everything for ts in QA_TRAIN_TEMPLATES.values() for t in ts)
        assert any(t.format(n=q["entity"], v=q["answers"][0]) in everything for t in TRAIN_TEMPLATES[q["attribute"]])
    with pytest.raises(ValueError, match="--qa-fraction"):
        generate(str(tmp_path / "bad"), 4, 0, qa_fraction=1.0)
