"""The lm_eval adapter against the built-in scorer and full forwards, without lm_eval: lm_eval is not a
dependency, so a minimal stand-in of its LM base class and registry is installed in sys.modules (which checks
the registration path too). tests/test_eval_lm_eval_harness.py runs the adapter inside the real lm_eval."""
import importlib
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from data import load_tokenizer
from eval.generate import generate_text
from eval.scoring import continuation_logprobs
from eval.text import encode_request
from _eval_helpers import tiny_model


@dataclass
class FakeInstance:  # lm_eval.api.instance.Instance exposes the request through .args
    args: tuple


@pytest.fixture
def fake_lm_eval(monkeypatch):
    registry = {}
    lm_eval = types.ModuleType("lm_eval")
    api = types.ModuleType("lm_eval.api")
    model_mod = types.ModuleType("lm_eval.api.model")
    reg_mod = types.ModuleType("lm_eval.api.registry")

    class LM:
        def __init__(self):
            self._rank, self._world_size, self.cache_hook = 0, 1, None

    def register_model(*names):
        def deco(cls):
            for n in names:
                registry[n] = cls
            return cls
        return deco

    model_mod.LM, reg_mod.register_model = LM, register_model
    for name, mod in (("lm_eval", lm_eval), ("lm_eval.api", api), ("lm_eval.api.model", model_mod),
                      ("lm_eval.api.registry", reg_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    import eval.lm_eval_adapter as adapter

    adapter = importlib.reload(adapter)
    yield adapter, registry, LM
    monkeypatch.undo()
    importlib.reload(adapter)


def test_adapter_absent_without_lm_eval(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # import lm_eval(.anything) -> ImportError
    import eval.lm_eval_adapter as adapter

    try:
        adapter = importlib.reload(adapter)
        assert adapter.MnemoLM is None
        assert adapter.MnemoLMCore is not None
        with pytest.raises(SystemExit, match="pip install lm_eval"):
            adapter.main([])
    finally:  # leave the module as a plain import finds it (with the real lm_eval where installed)
        monkeypatch.undo()
        importlib.reload(adapter)


def test_adapter_matches_builtin_scorer(fake_lm_eval):
    adapter, registry, LM = fake_lm_eval
    assert registry["mnemo"] is adapter.MnemoLM and issubclass(adapter.MnemoLM, LM)
    model, tok = tiny_model(), load_tokenizer("byte")
    lm = adapter.MnemoLM(model=model, tokenizer=tok, batch_size=2)
    pairs = [("The capital of France is", " Paris"), ("", "Hello world"), ("Q: 2+2? A:", " 4")]
    got = lm.loglikelihood([FakeInstance(p) for p in pairs])
    builtin = continuation_logprobs(model, [encode_request(tok, c, x) for c, x in pairs], batch_size=2)
    assert got == builtin
    # and against an independent full forward, BOS-only context included (first token scored)
    for (ctx, cont), (score, _) in zip(pairs, got):
        seq = [tok.bos_id] + list(ctx.encode()) + list(cont.encode())
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])), -1)[0]
        n = len(cont.encode())
        ref = sum(logp[len(seq) - 1 - n + j, seq[len(seq) - n + j]].item() for j in range(n))
        assert score == pytest.approx(ref, abs=1e-4)


def test_adapter_rolling_and_generate(fake_lm_eval):
    adapter, _, _ = fake_lm_eval
    model, tok = tiny_model(), load_tokenizer("byte")
    lm = adapter.MnemoLM(model=model, tokenizer=tok)
    text = "Memory layers at scale store facts. " * 4  # 144 bytes > max_seq_len (64): three windows
    (rolling,) = lm.loglikelihood_rolling([FakeInstance((text,))])
    seq = [tok.bos_id] + list(text.encode())
    ref = 0.0
    # lm_eval's windows: 64 predictions each, from the token before them; the last (short) one gets a full
    # 64-token input, so its first prediction sees the 64 - 16 + 1 tokens before it
    for start in range(0, len(seq) - 1, 64):
        n = min(64, len(seq) - 1 - start)
        window = seq[max(0, start + n - 64):start + n + 1]
        assert len(window) - 1 <= 64
        logp = torch.log_softmax(model(torch.tensor([window[:-1]])), -1)[0]
        ref += sum(logp[j, window[j + 1]].item() for j in range(len(window) - 1 - n, len(window) - 1))
    assert rolling == pytest.approx(ref, rel=1e-5)
    assert adapter.rolling_windows(list(range(10)), 99, 4) == [
        ([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]  # the example in lm_eval's LM docstring
    reqs = [FakeInstance(("Hello", {"until": ["\n"], "max_gen_toks": 5})), FakeInstance(("Hi there", {"until": "zz", "max_gen_toks": 3}))]
    out = lm.generate_until(reqs)
    assert out[0] == generate_text(model, tok, ["Hello"], 5, stop=["\n"])[0]
    assert out[1] == generate_text(model, tok, ["Hi there"], 3, stop=["zz"])[0]


def test_adapter_needs_model_or_checkpoint(fake_lm_eval):
    adapter, _, _ = fake_lm_eval
    with pytest.raises(ValueError, match="checkpoint"):
        adapter.MnemoLM()
    model, tok = tiny_model(), load_tokenizer("byte")
    with pytest.raises(ValueError, match="batch_size"):
        adapter.MnemoLM(model=model, tokenizer=tok, batch_size="many")
    assert adapter.MnemoLM(model=model, tokenizer=tok, batch_size="auto:4", max_batch_size=8).batch_size == 8
    assert adapter.MnemoLM(model=model, tokenizer="byte", dtype="bf16").amp_dtype == torch.bfloat16
