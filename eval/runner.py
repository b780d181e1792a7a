"""Run QA tasks on a model: the entry point for periodic evaluation in training and for `python -m eval`.

Generative tasks: answer NLL of the first listed answer given the (k-shot) prompt, and, when cfg.generate,
greedy decoding up to a stop string scored by exact match and token F1 (best over the answers).
Multiple-choice tasks: log-likelihood of each choice; accuracy, length-normalised accuracy, and the NLL of
the gold choice.

Distributed (torch.distributed initialised): every rank must call run_tasks; examples are split across
ranks (padded to the same count, padding weighted 0) and the sums are all-reduced, so every rank returns the
same numbers. Forward counts are kept equal across ranks, which a sharded model needs.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch

from .config import EvalConfig
from .device import all_reduce_sum, model_device, rank_and_world
from .fewshot import TARGET_DELIMITER, build_prompt
from .generate import generate_text
from .metrics import choice_correct, choice_correct_norm, exact_match, token_f1
from .sinks import write_jsonl
from .scoring import continuation_logprobs
from .tasks import GENERATIVE, Task, load_tasks
from .text import encode_request


def load_eval_tasks(cfg: EvalConfig) -> List[Task]:
    """Read every task of cfg.tasks once (train keeps the result and passes it to run_tasks)."""
    tasks: List[Task] = []
    for spec in cfg.tasks:
        tasks.extend(load_tasks(spec, cfg.qa_wikidata_path, cfg.max_examples))
    return tasks


def _my_indices(n: int) -> List[tuple]:
    """(example index, weight) for this rank: a strided share, padded with weight-0 repeats to equal length."""
    rank, world = rank_and_world()
    per_rank = -(-n // world)
    mine = list(range(rank, n, world))
    pad = per_rank - len(mine)
    return [(i, 1.0) for i in mine] + [(mine[0] if mine else 0, 0.0)] * pad


def _eval_generative(model, tokenizer, task: Task, cfg: EvalConfig, amp_dtype) -> torch.Tensor:
    share = _my_indices(len(task.examples))
    prompts = [build_prompt(task.examples, i, cfg.num_fewshot, cfg.seed) for i, _ in share]
    reqs = [encode_request(tokenizer, p, TARGET_DELIMITER + task.examples[i].answers[0], cfg.add_bos)
            for p, (i, _) in zip(prompts, share)]
    scores = continuation_logprobs(model, reqs, cfg.batch_size, amp_dtype)
    w = torch.tensor([wt for _, wt in share], dtype=torch.float64)
    nll = torch.tensor([-s for s, _ in scores], dtype=torch.float64)
    n_tok = torch.tensor([len(c) for _, c in reqs], dtype=torch.float64)
    em = f1 = torch.zeros(len(share), dtype=torch.float64)
    if cfg.generate:
        texts = generate_text(model, tokenizer, prompts, cfg.max_new_tokens, stop=list(cfg.stop),
                              temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                              batch_size=cfg.batch_size, add_bos=cfg.add_bos, amp_dtype=amp_dtype)
        em = torch.tensor([exact_match(t, task.examples[i].answers) for t, (i, _) in zip(texts, share)], dtype=torch.float64)
        f1 = torch.tensor([token_f1(t, task.examples[i].answers) for t, (i, _) in zip(texts, share)], dtype=torch.float64)
    return torch.stack([w.sum(), (w * em).sum(), (w * f1).sum(), (w * nll).sum(), (w * n_tok).sum()])


def _eval_multiple_choice(model, tokenizer, task: Task, cfg: EvalConfig, amp_dtype) -> torch.Tensor:
    share = _my_indices(len(task.examples))
    reqs, spans = [], []
    for i, _ in share:
        ex = task.examples[i]
        prompt = build_prompt(task.examples, i, cfg.num_fewshot, cfg.seed)
        spans.append((len(reqs), len(ex.choices)))
        reqs.extend(encode_request(tokenizer, prompt, TARGET_DELIMITER + c, cfg.add_bos) for c in ex.choices)
    scores = [s for s, _ in continuation_logprobs(model, reqs, cfg.batch_size, amp_dtype)]
    sums = torch.zeros(4, dtype=torch.float64)  # n, acc, acc_norm, gold nll
    for (i, w), (start, k) in zip(share, spans):
        ex, ll = task.examples[i], scores[start:start + k]
        sums += w * torch.tensor([1.0, choice_correct(ll, ex.label), choice_correct_norm(ll, ex.choices, ex.label), -ll[ex.label]],
                                 dtype=torch.float64)
    return sums


def run_tasks(
    model: torch.nn.Module,
    tokenizer,
    cfg: EvalConfig,
    step: Optional[int] = None,
    tasks: Optional[Sequence[Task]] = None,
    amp_dtype: Optional[torch.dtype] = None,
    out_path: Optional[str] = None,
) -> Dict[str, Dict[str, float]]:
    """Evaluate `model` on cfg.tasks. Returns {task name: {metric: value}}, the same on every rank.

    tasks: preloaded `load_eval_tasks(cfg)` (saves re-reading files at every evaluation); default: load now.
    amp_dtype: autocast dtype (e.g. torch.bfloat16 on GPU); None runs in the model's dtype.
    out_path: when given, rank 0 appends one jsonl record per task ({"step", "task", metrics..., "seconds"}).
    The model is put in eval mode and restored to its previous mode; gradients are off.
    """
    if tasks is None:
        tasks = load_eval_tasks(cfg)
    device = model_device(model)
    results: Dict[str, Dict[str, float]] = {}
    records = []
    for task in tasks:
        t0 = time.perf_counter()
        if task.kind == GENERATIVE:
            s = all_reduce_sum(_eval_generative(model, tokenizer, task, cfg, amp_dtype).to(device)).tolist()
            r = {"n": int(s[0]), "answer_nll": s[3] / s[0], "answer_nll_per_token": s[3] / s[4]}
            if cfg.generate:
                r.update(em=s[1] / s[0], f1=s[2] / s[0])
        else:
            s = all_reduce_sum(_eval_multiple_choice(model, tokenizer, task, cfg, amp_dtype).to(device)).tolist()
            r = {"n": int(s[0]), "acc": s[1] / s[0], "acc_norm": s[2] / s[0], "answer_nll": s[3] / s[0]}
        results[task.name] = r
        records.append({"step": step, "task": task.name, "num_fewshot": cfg.num_fewshot, **r,
                        "seconds": round(time.perf_counter() - t0, 3)})
    if out_path is not None and rank_and_world()[0] == 0:
        write_jsonl(out_path, records)
    return results
