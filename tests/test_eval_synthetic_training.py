"""A tiny memory model trained briefly on synthetic-facts documents must give the gold answers a lower NLL
than the same model untrained. The loop is written here: eval must not depend on train."""
import time

import pytest
import torch

from data import load_tokenizer
from eval import EvalConfig, run_tasks
from eval.synthetic_facts import generate
from model import MemoryConfig, ModelConfig, Transformer


def read_docs(path):
    import json

    with open(path) as f:
        return [json.loads(l)["text"] for l in f]


@pytest.mark.slow
def test_brief_training_lowers_answer_nll(tmp_path):
    t0 = time.perf_counter()
    generate(str(tmp_path), n_entities=16, seed=0, docs_per_entity=4)
    tok = load_tokenizer("byte")
    stream = []
    for text in read_docs(tmp_path / "train.jsonl"):
        stream += [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    stream = torch.tensor(stream)
    cfg = ModelConfig(vocab_size=259, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=128,
                      memory=MemoryConfig(layers=[1], n_keys=16, heads=2, knn=8, k_dim=32, backend="reference"))
    torch.manual_seed(0)
    model = Transformer(cfg)
    eval_cfg = EvalConfig(tasks=[f"synthetic:{tmp_path}"], max_examples=40, batch_size=20, generate=False)
    before = run_tasks(model, tok, eval_cfg)["synthetic_qa"]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    seq, batch = 64, 8
    model.train()
    for step in range(120):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        window = torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = run_tasks(model, tok, eval_cfg)["synthetic_qa"]
    # Untrained: ~log(259) = 5.56 nats per byte. Trained: the answers' spelling and the attribute vocabulary
    # are learned from the documents.
    assert before["answer_nll_per_token"] > 5.0
    assert after["answer_nll"] < 0.6 * before["answer_nll"], (before, after)
    assert model.training  # run_tasks restored the mode
    print(f"answer NLL {before['answer_nll']:.2f} -> {after['answer_nll']:.2f} in {time.perf_counter() - t0:.1f}s")
