"""Scoring, KV-cached generation and validation NLL against plain full forwards of a tiny memory model."""
import math

import pytest
import torch

from data import load_tokenizer
from eval.generate import generate_text, generate_tokens, sample_next
from eval.scoring import continuation_logprobs
from eval.text import encode_request
from eval.validation import validation_metrics, validation_nll
from _eval_helpers import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


def reference_logprob(model, ctx, cont):
    """Sum of log p(cont[j] | ...) from one full forward of ctx + cont[:-1]."""
    seq = torch.tensor([list(ctx) + list(cont)[:-1]])
    logp = torch.log_softmax(model(seq).float(), -1)[0]
    n = len(ctx)
    return sum(logp[n + j - 1, cont[j]].item() for j in range(len(cont)))


def test_loglikelihood_equals_full_forward_sum(model, tok):
    reqs = [encode_request(tok, "The capital of France is", " Paris"),
            encode_request(tok, "", "Hello"),  # BOS-only prompt: the first continuation token must be scored
            encode_request(tok, "A", " much longer continuation text"),
            ([tok.bos_id], [7])]
    got = continuation_logprobs(model, reqs, batch_size=3)  # two batches, right-padded
    for (ctx, cont), (score, greedy) in zip(reqs, got):
        assert score == pytest.approx(reference_logprob(model, ctx, cont), abs=1e-4)
    # The BOS-only case covers all 5 tokens of "Hello": dropping the first would change the sum.
    ctx, cont = reqs[1]
    assert ctx == [tok.bos_id] and len(cont) == 5
    dropped = reference_logprob(model, ctx + cont[:1], cont[1:])
    assert abs(got[1][0] - dropped) > 1e-3
    # is_greedy agrees with argmax of the reference
    ctx, cont = reqs[3]
    logits = model(torch.tensor([ctx]))[0, -1]
    assert got[3][1] == (int(logits.argmax()) == cont[0])
    greedy_tok = int(logits.argmax())
    assert continuation_logprobs(model, [(ctx, [greedy_tok])])[0][1] is True


def test_loglikelihood_truncates_long_context_from_the_left(tok):
    m = tiny_model(max_seq_len=16)
    ctx, cont = [tok.bos_id] + list(range(30)), [40, 41]
    score = continuation_logprobs(m, [(ctx, cont)])[0][0]
    seq = (ctx + cont)[-17:]
    assert score == pytest.approx(reference_logprob(m, seq[:-2], cont), abs=1e-4)


@pytest.mark.parametrize("memory", [True, False])
def test_kv_cache_decoding_matches_full_recompute(memory):
    m = tiny_model(memory=memory)
    torch.manual_seed(1)
    seq = torch.randint(0, 256, (2, 12))
    full = m(seq)
    cache = m.make_kv_cache(2, 12)
    pieces = [m(seq[:, :5], cache=cache, start_pos=0)]
    for p in range(5, 12):  # one token at a time
        pieces.append(m(seq[:, p:p + 1], cache=cache, start_pos=p))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_matches_rows_alone(model):
    """positions/key_valid make a left-padded row decode exactly as the row alone."""
    a, b = [257, 5, 6, 7, 8, 9], [257, 3]
    # logits of the prefill: padded row b (4 pads in front) vs b alone
    tokens = torch.tensor([a, [0, 0, 0, 0] + b])
    valid = torch.tensor([[True] * 6, [False] * 4 + [True] * 2])
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    padded = model(tokens, cache=model.make_kv_cache(2, 8), start_pos=0, positions=positions, key_valid=valid)
    torch.testing.assert_close(padded[1, 4:], model(torch.tensor([b]))[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded[0], model(torch.tensor([a]))[0], atol=1e-4, rtol=1e-4)
    out = generate_tokens(model, [a, b], 6)
    assert out[0] == generate_tokens(model, [a], 6)[0]
    assert out[1] == generate_tokens(model, [b], 6)[0]
    assert all(len(o) == 6 for o in out)


def test_greedy_generation_matches_argmax_recompute(model):
    prompt = [257, 10, 20, 30]
    gen = generate_tokens(model, [prompt], 8)[0]
    seq = list(prompt)
    for _ in range(8):  # no cache: full forward every step
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert gen == seq[len(prompt):]
    assert len(set(gen)) > 1  # a constant output would make this test weak


def test_batched_generation_equals_one_at_a_time(model, tok):
    prompts = ["Hi", "The quick brown fox jumps", "A", "Memory layers store facts"]
    batched = generate_text(model, tok, prompts, max_new_tokens=7, stop=None, batch_size=4)
    single = [generate_text(model, tok, [p], max_new_tokens=7, stop=None, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1


def test_stop_strings_and_stop_tokens(model, tok):
    text = generate_text(model, tok, ["Hi"], max_new_tokens=10, stop=None)[0]
    assert len(text.encode("utf-8", errors="ignore")) > 0
    stop = text[2:4] if len(text) >= 4 else text[-1]
    cut = generate_text(model, tok, ["Hi"], max_new_tokens=10, stop=[stop])[0]
    assert cut == text[: text.index(stop)]
    # A stop token ends the row and is kept in generate_tokens' output.
    first = generate_tokens(model, [[257, 72, 105]], 5)[0]
    assert generate_tokens(model, [[257, 72, 105]], 5, stop_ids=[first[1]])[0] == first[:2]


def test_sampling_temperature_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    assert sample_next(logits, 0.0, 1.0, None).item() == 1
    # top_p small: only the most likely token can be drawn
    assert {sample_next(logits, 1.0, 0.1, g).item() for _ in range(50)} == {1}
    # top_p 0.9 with these probs (0.04, 0.50, 0.46, ~0): tokens 1 and 2 only
    draws = {sample_next(logits, 1.0, 0.9, g).item() for _ in range(200)}
    assert draws == {1, 2}
    assert len({sample_next(logits, 5.0, 1.0, g).item() for _ in range(200)}) >= 3


def test_sampled_generation_deterministic_under_seed(model):
    p = [[257, 1, 2, 3]]
    a = generate_tokens(model, p, 8, temperature=1.0, seed=3)
    assert a == generate_tokens(model, p, 8, temperature=1.0, seed=3)
    assert any(generate_tokens(model, p, 8, temperature=1.0, seed=s) != a for s in range(4, 8))


def test_validation_nll_and_bits_per_byte(model, tok):
    torch.manual_seed(0)
    batches = [torch.randint(0, 256, (2, 9)) for _ in range(3)]
    r = validation_nll(model, batches, tok)
    logits = [model(b[:, :-1]) for b in batches]
    expect = torch.stack([torch.nn.functional.cross_entropy(l.reshape(-1, 259), b[:, 1:].reshape(-1), reduction="sum")
                          for l, b in zip(logits, batches)]).sum().item()
    assert r["tokens"] == 48 and r["loss"] == pytest.approx(expect / 48, rel=1e-5)
    # byte tokens decode to one byte each, except non-UTF-8 sequences (replacement chars): count via decode
    n_bytes = sum(len(tok.decode(row).encode()) for b in batches for row in b[:, 1:].tolist())
    assert r["bytes"] == n_bytes and r["bpb"] == pytest.approx(expect / math.log(2) / n_bytes, rel=1e-5)
    m = validation_metrics(model, {"a": batches[:1], "b": batches[1:]}, tok)
    assert m["val/loss"] == pytest.approx(r["loss"], rel=1e-5) and m["val/bpb"] == pytest.approx(r["bpb"], rel=1e-5)
    assert set(m) == {"val/loss", "val/bpb", "val/a/loss", "val/a/bpb", "val/b/loss", "val/b/bpb"}
    assert model.training is False
