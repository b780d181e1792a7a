"""The lm_eval adapter inside the real lm-evaluation-harness (skipped where lm_eval is not installed).

Requests are lm_eval's own Instance objects, the model comes from lm_eval's registry and model_args, and
simple_evaluate runs local tasks (task YAMLs over jsonl files in a tmp dir) with the network refused. The
numbers are checked against eval's built-in scorer and task runner and against full forwards.
"""
import importlib
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from data import load_tokenizer  # noqa: E402
from eval import EvalConfig, run_tasks  # noqa: E402
from eval.generate import generate_text  # noqa: E402
from eval.scoring import continuation_logprobs  # noqa: E402
from eval.text import encode_request  # noqa: E402
from _eval_helpers import tiny_model  # noqa: E402

MAX_LEN = 64  # tiny_model's context

PAIRS = [("The capital of France is", " Paris"), ("", "Hello world"), ("Q: 2+2? A:", " 4"),
         ("Trailing space ", "moves"), ("ünïcode", " ✓")]


def inst(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("unit", i, 1))


@pytest.fixture
def adapter():
    import eval.lm_eval_adapter as mod

    if mod.MnemoLM is None or get_model("mnemo") is not mod.MnemoLM:  # another test reloaded it without lm_eval
        mod = importlib.reload(mod)
    return mod


@pytest.fixture
def lm(adapter):
    return adapter.MnemoLM(model=tiny_model(), tokenizer=load_tokenizer("byte"), batch_size=2)


def full_logp(model, seq):
    """log-probs of seq[1:] from one forward over seq[:-1] (the reference)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).float(), -1)[0]
    return logp, logp.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)


def test_registered_under_mnemo_and_is_a_concrete_lm(adapter):
    cls = get_model("mnemo")
    assert cls is adapter.MnemoLM and issubclass(cls, LM) and not cls.__abstractmethods__


def test_loglikelihood_equals_builtin_scorer(lm):
    model, tok = lm.model, lm.tokenizer
    got = lm.loglikelihood([inst("loglikelihood", p, i) for i, p in enumerate(PAIRS)])
    builtin = continuation_logprobs(model, [encode_request(tok, c, x) for c, x in PAIRS], batch_size=2)
    assert got == builtin
    for (ctx, cont), (score, greedy) in zip(PAIRS, got):
        c, x = encode_request(tok, ctx, cont)
        seq = c + x
        logp, tok_lp = full_logp(model, seq)
        n = len(x)
        assert score == pytest.approx(tok_lp[-n:].sum().item(), abs=1e-4)
        assert greedy == bool((logp[-n:].argmax(-1) == torch.tensor(x)).all())
    # BOS-only context: every continuation token is scored, the first included
    (empty,) = lm.loglikelihood([inst("loglikelihood", ("", "Hello world"))])
    _, tok_lp = full_logp(model, [tok.bos_id] + list(b"Hello world"))
    assert len(tok_lp) == len("Hello world") and empty[0] == pytest.approx(tok_lp.sum().item(), abs=1e-4)
    assert lm.loglikelihood([inst("loglikelihood", ("abc", ""))]) == [(0.0, True)]


def test_is_greedy_on_known_continuations(lm):
    model, tok = lm.model, lm.tokenizer
    found = 0
    for ctx in [f"Item {i}:" for i in range(60)]:
        seq = [tok.bos_id] + list(ctx.encode())
        logp, _ = full_logp(model, seq + [0])
        top = int(logp[-1].argmax())
        if not 32 <= top < 127:  # the argmax must be a printable ASCII byte to be written as a string
            continue
        worst = min(range(32, 127), key=lambda b: logp[-1, b].item())
        (hit, miss) = lm.loglikelihood([inst("loglikelihood", (ctx, chr(top))), inst("loglikelihood", (ctx, chr(worst)))])
        assert hit[1] is True and miss[1] is False
        assert hit[0] == pytest.approx(logp[-1, top].item(), abs=1e-4) and miss[0] < hit[0]
        found += 1
        if found == 3:
            break
    assert found == 3, "no context among 60 whose greedy next byte is printable ASCII"


def test_rolling_matches_full_forward_and_lm_evals_windows(lm):
    model, tok = lm.model, lm.tokenizer
    short = "Memory layers store facts."
    long = "Memory layers at scale store facts; dense layers compute. " * 3  # 177 bytes: 3 windows of <= 64
    got = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (t,), i) for i, t in enumerate([short, long, ""])])
    _, tok_lp = full_logp(model, [tok.bos_id] + list(short.encode()))
    assert got[0] == pytest.approx(tok_lp.sum().item(), abs=1e-4)  # fits the context: one full forward
    assert got[0] == pytest.approx(lm.loglikelihood([inst("loglikelihood", ("", short))])[0][0], abs=1e-6)
    ref, n_scored = 0.0, 0
    for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(list(long.encode()), tok.bos_id, MAX_LEN, 1)):
        seq = ctx + pred
        assert len(seq) - 1 <= MAX_LEN
        ref += full_logp(model, seq)[1][-len(pred):].sum().item()
        n_scored += len(pred)
    assert n_scored == len(long.encode())
    assert got[1] == pytest.approx(ref, abs=1e-3)
    assert got[2] == 0.0


def test_generate_until_stops_at_stop_string(lm):
    model, tok = lm.model, lm.tokenizer
    prompt = "Hello"
    free = generate_text(model, tok, [prompt], 12)[0]
    stop = next((ch for ch in free[2:] if ch.isprintable() and ch != "\ufffd"), None)
    assert stop is not None, f"no usable stop character in {free!r}"
    reqs = [inst("generate_until", (prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), 0),
            inst("generate_until", ("Hi there", {"until": "zz", "max_gen_toks": 3}), 1),
            inst("generate_until", (prompt, {"until": [stop, "\n"], "max_gen_toks": 12, "temperature": 0.0}), 2)]
    out = lm.generate_until(reqs)
    assert out[0] == free[:free.index(stop)] and stop not in out[0] and len(out[0]) < len(free)
    assert out[1] == generate_text(model, tok, ["Hi there"], 3, stop=["zz"])[0]
    assert len(out[1].encode()) <= 3
    assert out[2] == generate_text(model, tok, [prompt], 12, stop=[stop, "\n"])[0]
    # a budget beyond the context is capped (lm_eval's default max_gen_toks is 256; this model has 64)
    (long,) = lm.generate_until([inst("generate_until", (prompt, {"until": [], "max_gen_toks": 256}))])
    assert isinstance(long, str)


def save_checkpoint(root):
    import torch.distributed.checkpoint as dcp

    from model.checkpoint import model_config_to_dict

    model = tiny_model()
    ckpt = root / "run" / "checkpoints" / "step_3"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "model_config": model_config_to_dict(model.cfg)}))
    return model, root / "run"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_built_from_model_args_string(adapter, tmp_path):
    model, run = save_checkpoint(tmp_path)
    lm = get_model("mnemo").create_from_arg_string(
        f"checkpoint={run},tokenizer=byte,device=cpu,dtype=fp32",
        {"batch_size": "auto", "max_batch_size": 3, "device": None})
    assert isinstance(lm, adapter.MnemoLM) and lm.batch_size == 3 and lm.device == torch.device("cpu")
    assert lm.max_length == MAX_LEN and lm.amp_dtype is None and lm.rank == 0 and lm.world_size == 1
    assert lm.get_model_info()["checkpoint"] == str(run)
    direct = adapter.MnemoLM(model=model, tokenizer=load_tokenizer("byte"), batch_size=3)
    reqs = [inst("loglikelihood", p, i) for i, p in enumerate(PAIRS)]
    assert lm.loglikelihood(reqs) == direct.loglikelihood(reqs)  # same weights, same batching: same numbers
    lm2 = get_model("mnemo").create_from_arg_string(f"checkpoint={run},tokenizer=byte,batch_size=5,add_bos=false")
    assert lm2.batch_size == 5 and lm2.add_bos is False
    with pytest.raises(ValueError, match="dtype"):
        adapter.MnemoLM(model=model, tokenizer=load_tokenizer("byte"), dtype="fp8")


# ---- simple_evaluate on local tasks ----------------------------------------------------------------------

MC = [{"prompt": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "label": 0},
      {"prompt": "Two plus two is", "choices": ["four", "five"], "label": 0},
      {"prompt": "The sky is", "choices": ["blue", "green", "red"], "label": 1},
      {"prompt": "Fish live in", "choices": ["water", "trees"], "label": 0},
      {"prompt": "Snow is", "choices": ["cold", "hot", "loud", "sweet"], "label": 2}]
GEN = [{"prompt": "Q: What is the capital of France?\nA:", "answers": ["Paris"]},
       {"prompt": "Q: Who wrote Hamlet?\nA:", "answers": ["Shakespeare"]},
       {"prompt": "Hello", "answers": ["world"]}]
PPL = [{"text": "Memory layers store facts."},
       {"text": "Product keys make a million-slot memory cheap to search. " * 3}]


def write_tasks(d):
    files = {}
    for name, rows in (("mc", MC), ("gen", GEN), ("ppl", PPL)):
        files[name] = d / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (d / "mc.yaml").write_text(
        "task: mnemo_local_mc\n" + common.format(path=files["mc"]) +
        'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    (d / "gen.yaml").write_text(
        "task: mnemo_local_gen\n" + common.format(path=files["gen"]) +
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answers[0]}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    (d / "ppl.yaml").write_text(
        "task: mnemo_local_ppl\n" + common.format(path=files["ppl"]) +
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n")
    return files


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Refuse (and record) any network connection; keep the datasets cache in tmp."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def task_manager(path):
    from lm_eval.tasks import TaskManager

    try:
        return TaskManager(include_path=str(path), include_defaults=False)
    except TypeError:  # older lm_eval: no include_defaults
        return TaskManager(include_path=str(path))


def test_simple_evaluate_on_local_tasks(lm, tmp_path, offline):
    files = write_tasks(tmp_path)
    res = lm_eval.simple_evaluate(model=lm, tasks=["mnemo_local_mc", "mnemo_local_gen", "mnemo_local_ppl"],
                                  task_manager=task_manager(tmp_path), bootstrap_iters=0, log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    r, samples = res["results"], res["samples"]
    model, tok = lm.model, lm.tokenizer
    # multiple choice: same log-likelihoods, accuracy and gold NLL as the built-in runner on the same jsonl
    builtin = run_tasks(model, tok, EvalConfig(tasks=[f"jsonl:{files['mc']}"], max_examples=0, batch_size=3))["mc"]
    assert r["mnemo_local_mc"]["acc,none"] == pytest.approx(builtin["acc"])
    by_doc = sorted(samples["mnemo_local_mc"], key=lambda s: s["doc_id"])
    gold_nll = [-s["resps"][s["doc"]["label"]][0][0] for s in by_doc]
    assert sum(gold_nll) / len(gold_nll) == pytest.approx(builtin["answer_nll"], rel=1e-6)
    for s in by_doc:
        ex = MC[s["doc_id"]]
        reqs = [encode_request(tok, ex["prompt"], " " + c) for c in ex["choices"]]
        ref = continuation_logprobs(model, reqs)  # batched differently from lm_eval's run: float noise only
        assert [x[0][0] for x in s["resps"]] == pytest.approx([v[0] for v in ref], rel=1e-5)
        assert [x[0][1] for x in s["resps"]] == [v[1] for v in ref]
    # generation: lm_eval's requests give the built-in decoder's text, cut at "\n" or "."
    for s in samples["mnemo_local_gen"]:
        want = generate_text(model, tok, [GEN[s["doc_id"]]["prompt"]], 6, stop=["\n", "."])[0]
        assert s["resps"] == [[want]] and "\n" not in want and "." not in want
    assert 0.0 <= r["mnemo_local_gen"]["exact_match,none"] <= 1.0
    # perplexity: lm_eval's rolling requests, its bits per byte from our log-likelihoods
    ppl = sorted(samples["mnemo_local_ppl"], key=lambda s: s["doc_id"])
    lls = [s["resps"][0][0] for s in ppl]
    assert lls == pytest.approx(lm.loglikelihood_rolling([inst("loglikelihood_rolling", (d["text"],)) for d in PPL]))
    n_bytes = sum(len(d["text"].encode()) for d in PPL)
    assert r["mnemo_local_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-6)


@pytest.mark.slow  # ~10 s: a subprocess whose lm_eval CLI indexes all of lm_eval's built-in task YAMLs
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_lm_eval_command_line(tmp_path):
    """python -m eval.lm_eval_adapter: lm_eval's own CLI with "mnemo" registered, from a saved checkpoint."""
    _, run = save_checkpoint(tmp_path)
    write_tasks(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    cmd = [sys.executable, "-m", "eval.lm_eval_adapter", "--model", "mnemo",
           "--model_args", f"checkpoint={run},tokenizer=byte", "--device", "cpu", "--tasks", "mnemo_local_mc",
           "--include_path", str(tmp_path), "--batch_size", "4", "--output_path", str(out)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [p for p in out.rglob("results*.json")]
    assert results, f"no results under {out}: {proc.stdout[-2000:]}"
    data = json.loads(results[0].read_text())
    assert 0.0 <= data["results"]["mnemo_local_mc"]["acc,none"] <= 1.0
    assert data["config"]["model"] == "mnemo"
