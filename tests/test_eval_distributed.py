"""Across 2 gloo ranks: validation NLL/bpb and QA metrics equal the single-process numbers, and every
forward runs in lockstep with the same shape on both ranks (which a sharded model needs)."""
import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist

from data import load_tokenizer
from eval import EvalConfig, run_tasks, validation_nll
from eval.synthetic_facts import generate
from _dist_helpers import start_ranks
from _eval_helpers import tiny_model as _tiny_model


def tiny_model():
    return _tiny_model(max_seq_len=256, weight_scale=4.0)


class Lockstep(torch.nn.Module):
    """Stands in for a sharded model: a collective in every forward, recording shape disagreements."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg, self.mismatches, self.calls = inner, inner.cfg, 0, 0

    def make_kv_cache(self, *args, **kwargs):
        return self.inner.make_kv_cache(*args, **kwargs)

    def forward(self, tokens, **kwargs):
        shape = torch.tensor(tokens.shape)
        shapes = [torch.zeros_like(shape) for _ in range(dist.get_world_size())]
        dist.all_gather(shapes, shape)
        self.mismatches += int(any(not torch.equal(s, shape) for s in shapes))
        self.calls += 1
        return self.inner(tokens, **kwargs)


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 17), generator=g) for _ in range(3)] + [torch.randint(0, 256, (1, 9), generator=g)]


def eval_cfg(syn_dir):
    # 7 examples: ranks get 4 and 3 (one weight-0 pad), an uneven split on purpose
    return EvalConfig(tasks=[f"synthetic:{syn_dir}"], max_examples=7, batch_size=2, max_new_tokens=4)


def _worker(rank, world, init_file, syn_dir, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        tok, model = load_tokenizer("byte"), Lockstep(tiny_model())
        mine = batches()[:3] if rank == 0 else batches()[3:]  # 3 batches vs 1 smaller one
        val = validation_nll(model, mine, tok)
        res = run_tasks(model, tok, eval_cfg(syn_dir))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"val": val, "tasks": res, "mismatches": model.mismatches, "calls": model.calls}, f)
        dist.barrier()  # let every rank finish before any tears the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one(tmp_path):
    syn = tmp_path / "syn"
    generate(str(syn), 4, 0)
    start_ranks(_worker, (2, str(tmp_path / "init"), str(syn), str(tmp_path)), 2)
    tok, model = load_tokenizer("byte"), tiny_model()
    single_val = validation_nll(model, batches(), tok)
    single = run_tasks(model, tok, eval_cfg(syn))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["calls"] == got[1]["calls"] > 0
    for g in got:
        assert g["mismatches"] == 0
        assert g["val"]["tokens"] == single_val["tokens"] and g["val"]["bytes"] == single_val["bytes"]
        assert g["val"]["loss"] == pytest.approx(single_val["loss"], rel=1e-5)
        assert g["val"]["bpb"] == pytest.approx(single_val["bpb"], rel=1e-5)
        for task, metrics in single.items():
            assert g["tasks"][task]["n"] == metrics["n"] == 7
            for k, v in metrics.items():
                assert g["tasks"][task][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, k)
