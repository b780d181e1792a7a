"""Synthetic facts generator, run_tasks end to end, and `python -m eval` on a saved checkpoint."""
import json

import pytest
import torch

from data import load_tokenizer
from eval import EvalConfig, run_tasks
from eval.fewshot import build_prompt
from eval.generate import generate_text
from eval.metrics import exact_match, token_f1
from eval.scoring import continuation_logprobs
from eval.synthetic_facts import QA_TEMPLATES, TRAIN_TEMPLATES, generate, main as synth_main
from eval.tasks import load_tasks
from eval.text import encode_request
from model import MemoryConfig, ModelConfig, Transformer


def tiny_cfg():
    return ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=256,
                       memory=MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4, k_dim=16, backend="reference"))


def tiny_model():
    torch.manual_seed(0)
    return Transformer(tiny_cfg()).eval()


def read(path):
    with open(path) as f:
        return [json.loads(l) for l in f]


def test_synthetic_facts_files_deterministic_and_held_out(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert synth_main(["--out", str(a), "--n-entities", "12", "--seed", "3"]) == 0
    generate(str(b), 12, 3)
    generate(str(c), 12, 4)
    for f in ("train.jsonl", "val.jsonl", "qa.jsonl", "mc.jsonl", "meta.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    docs, qa, mc = read(a / "train.jsonl"), read(a / "qa.jsonl"), read(a / "mc.jsonl")
    assert len(docs) == 36 and len(qa) == 60 and len(mc) == 60 and all(set(d) == {"text"} for d in docs)
    text = " ".join(d["text"] for d in docs)
    for q, m in zip(qa, mc):
        assert q["answers"][0] in text and q["entity"] in text  # the fact is in the training documents
        assert q["prompt"] not in text  # ... but not in the question's wording
        assert m["choices"][m["label"]] == q["answers"][0] and len(set(m["choices"])) == 4
        # distractors are other people's values, seen in training (not rejectable as unfamiliar words)
        assert all(c in text for c in m["choices"])
    # every answer is stated in the documents next to its entity, under a training wording
    facts = {(q["entity"], q["attribute"]): q["answers"][0] for q in qa}
    for (name, attr), value in facts.items():
        assert any(t.format(n=name, v=value) in text for t in TRAIN_TEMPLATES[attr])
    train_words = {t.replace("{n}", "").replace("{v}", "").strip(" .") for ts in TRAIN_TEMPLATES.values() for t in ts}
    assert not any(q.format(n="").strip() in train_words for qs in QA_TEMPLATES.values() for q in qs)
    assert load_tasks(f"synthetic:{a}", "unused")[1].kind == "multiple_choice"


def test_run_tasks_matches_manual_computation(tmp_path):
    generate(str(tmp_path), 6, 0)
    tok, model = load_tokenizer("byte"), tiny_model()
    cfg = EvalConfig(tasks=[f"synthetic:{tmp_path}"], max_examples=8, batch_size=3, num_fewshot=1, max_new_tokens=6)
    out = tmp_path / "res.jsonl"
    res = run_tasks(model, tok, cfg, step=5, out_path=str(out))
    assert set(res) == {"synthetic_qa", "synthetic_mc"}
    qa, mc = load_tasks(f"synthetic:{tmp_path}", "", 8)
    prompts = [build_prompt(qa.examples, i, 1, 0) for i in range(8)]
    lls = continuation_logprobs(model, [encode_request(tok, p, " " + e.answers[0]) for p, e in zip(prompts, qa.examples)])
    texts = generate_text(model, tok, prompts, 6, stop=["\n"])
    r = res["synthetic_qa"]
    assert r["n"] == 8
    assert r["answer_nll"] == pytest.approx(-sum(s for s, _ in lls) / 8, rel=1e-6)
    assert r["em"] == pytest.approx(sum(exact_match(t, e.answers) for t, e in zip(texts, qa.examples)) / 8)
    assert r["f1"] == pytest.approx(sum(token_f1(t, e.answers) for t, e in zip(texts, qa.examples)) / 8)
    acc = 0
    for i, e in enumerate(mc.examples):
        p = build_prompt(mc.examples, i, 1, 0)
        ll = [s for s, _ in continuation_logprobs(model, [encode_request(tok, p, " " + c) for c in e.choices])]
        acc += max(range(len(ll)), key=lambda j: (ll[j], -j)) == e.label
    assert res["synthetic_mc"]["acc"] == pytest.approx(acc / 8) and res["synthetic_mc"]["n"] == 8
    recs = read(out)
    assert [x["task"] for x in recs] == ["synthetic_qa", "synthetic_mc"] and recs[0]["step"] == 5


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_cli_on_saved_checkpoint(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    from eval.__main__ import main
    from model.checkpoint import model_config_to_dict

    syn = tmp_path / "syn"
    generate(str(syn), 5, 0)
    ckpt = tmp_path / "run" / "checkpoints" / "step_7"
    model = tiny_model()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))  # the layout train writes (model part)
    (ckpt / "meta.json").write_text(json.dumps({"step": 7, "model_config": model_config_to_dict(tiny_cfg())}))
    rc = main([f"checkpoint={tmp_path / 'run'}", f"tasks=[synthetic:{syn}]", "tokenizer=byte", "max_examples=4",
               "max_new_tokens=4", "device=cpu"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "synthetic_qa" in printed and "step 7" in printed
    recs = read(tmp_path / "run" / "eval.jsonl")
    direct = run_tasks(model, load_tokenizer("byte"), EvalConfig(tasks=[f"synthetic:{syn}"], max_examples=4, max_new_tokens=4))
    assert recs[0]["answer_nll"] == pytest.approx(direct["synthetic_qa"]["answer_nll"], rel=1e-6)
    assert main([f"checkpoint={tmp_path / 'run'}", "tasks=[bogus]"]) == 2
    assert "tasks[0]" in capsys.readouterr().err
    # validation NLL from the run's config.yaml (which also names the tokenizer); checkpoint dir given directly
    (tmp_path / "run" / "config.yaml").write_text(
        f"data:\n  tokenizer: byte\n  seq_len: 16\n  train: [{{paths: ['{syn}/train.jsonl']}}]\n"
        f"  val: [{{paths: ['{syn}/val.jsonl']}}, {{paths: ['{syn}/train.jsonl']}}]\n")
    assert main([f"checkpoint={ckpt}", "val_batches=2", "val_batch_size=2"]) == 0
    printed = capsys.readouterr().out
    assert "val/val/loss" in printed and "val/train/bpb" in printed, printed
    val = read(tmp_path / "run" / "eval.jsonl")[-1]
    assert val["task"] == "val" and val["step"] == 7 and 0 < val["val/bpb"] < 20


def test_wandb_sink_is_lazy():
    import sys

    from eval.sinks import WandbSink

    had = "wandb" in sys.modules
    WandbSink("disabled").log({"x": 1.0}, step=1)
    assert ("wandb" in sys.modules) == had
    with pytest.raises(ValueError, match="wandb"):
        WandbSink("sometimes")
