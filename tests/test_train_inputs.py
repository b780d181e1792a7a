"""A run's inputs and its closing report: the tokenizer a resume must keep, the bad records skipped (reported as
totals), the loss against the unigram entropy said the right way round, and no DCP warning per save or load."""
import gzip
import json
import os
import warnings

import pytest

from _train_helpers import RUN_SMALL
from data import skipped_totals
from train.config import ConfigError, load_config
from train.inputs import check_run_tokenizer
from train.loop import run
from train.metrics import format_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_MODEL = os.path.join(ROOT, "data", "corpus", "tokenizer.model")


def config(run_dir, *extra):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), RUN_SMALL + [f"run_dir={run_dir}"] + list(extra))


def _fake_run(run_dir, with_checkpoint=True):
    """A run directory as a sentencepiece run leaves it: the tokenizer copy and (optionally) a checkpoint."""
    os.makedirs(os.path.join(run_dir, "checkpoints", "step_5"))
    with open(SP_MODEL, "rb") as f, open(os.path.join(run_dir, "tokenizer.model"), "wb") as g:
        g.write(f.read())
    if with_checkpoint:
        with open(os.path.join(run_dir, "checkpoints", "step_5", "meta.json"), "w") as f:
            json.dump({"step": 5}, f)


def test_resume_with_another_tokenizer_is_refused(tmp_path):
    from data import load_tokenizer

    _fake_run(tmp_path)
    cfg = config(tmp_path, "data.tokenizer=byte")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: 'byte' is the byte tokenizer, but the checkpoints in .* "
                                          r"were trained with sentencepiece model"):
        check_run_tokenizer(cfg, load_tokenizer("byte"))
    assert check_run_tokenizer(config(tmp_path), load_tokenizer(SP_MODEL)) == []  # the same one: fine
    # starting over (no resume) in that directory: allowed, with a warning
    fresh = config(tmp_path, "data.tokenizer=byte", "checkpoint.resume=false")
    warned = check_run_tokenizer(fresh, load_tokenizer("byte"))
    assert len(warned) == 1 and "earlier run's tokenizer" in warned[0]


def test_run_dir_without_checkpoints_warns_only(tmp_path):
    from data import load_tokenizer

    _fake_run(tmp_path, with_checkpoint=False)
    warned = check_run_tokenizer(config(tmp_path, "data.tokenizer=byte"), load_tokenizer("byte"))
    assert len(warned) == 1 and "replaces it" in warned[0]


def test_summary_says_above_or_below():
    none = {"skipped": 0}
    below = format_summary(10, 3.0, 4.0, none, 0.125)
    assert "25.0% below it" in below and "evaluation 12.5% of the time" in below
    above = format_summary(10, 5.0, 4.0, {"skipped": 3, "skipped_bad_json": 2, "skipped_empty_text": 1}, 0.0)
    assert "25.0% above it" in above and "below" not in above
    assert "3 bad training records skipped (bad_json 2, empty_text 1)" in above


def test_skipped_totals_sum_over_ranks():
    states = [{"stats": {"skipped_bad_json": 2, "skipped_empty_text": 0}}, {"stats": {"skipped_bad_json": 1,
                                                                                       "skipped_bad_utf8": 4}}]
    assert skipped_totals(states) == {"skipped": 7, "skipped_bad_json": 3, "skipped_bad_utf8": 4}


@pytest.mark.slow  # two short training runs
def test_run_reports_skipped_records_and_dcp_stays_quiet(tmp_path):
    with gzip.open(os.path.join(ROOT, "data", "corpus", "wiki_leads.train.jsonl.gz"), "rt") as f:
        lines = [next(f) for _ in range(200)]
    data = tmp_path / "mixed.jsonl"
    with open(data, "w") as f:
        for i, line in enumerate(lines):
            f.write(line)
            if i % 10 == 0:
                f.write("{not json\n")
    extra = [f"data.train=[{{paths: [{data}]}}]", "checkpoint.every=1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(config(tmp_path / "run", "train.steps=2", *extra))
        run(config(tmp_path / "run", "train.steps=3", *extra))  # resumes: a DCP load
    dcp = [str(w.message) for w in caught if "torch.distributed is disabled" in str(w.message)]
    assert dcp == []
    assert summary["skipped_records"] > 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["data/skipped"] == last["data/skipped_bad_json"] > 0
