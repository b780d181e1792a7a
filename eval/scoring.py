"""Log-likelihood scoring of continuations: the core of multiple choice, answer NLL and the lm_eval adapter.

A request is (context_tokens, continuation_tokens). Its score is the sum over continuation tokens of
log p(token | everything before it), from one causal forward over context + continuation[:-1]. The first
continuation token is predicted by the logits at the last context position; a context of only BOS is fine and
its first continuation token is still scored (a scorer that shifts by one and drops the BOS position loses it).

Batches are right-padded: under causal attention the padding after a sequence cannot change its logits, and
memory layers act per token, so no mask is needed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from model.device import autocast

from .device import all_max, max_seq_len, model_device

Request = Tuple[Sequence[int], Sequence[int]]


def _check(req: Request, i: int) -> None:
    ctx, cont = req
    if len(ctx) == 0:
        raise ValueError(f"request {i}: empty context; start it with BOS (or EOS) so the first token can be scored")
    if len(cont) == 0:
        raise ValueError(f"request {i}: empty continuation")


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    requests: Sequence[Request],
    batch_size: int = 16,
    amp_dtype: Optional[torch.dtype] = None,
    max_len: Optional[int] = None,
) -> List[Tuple[float, bool]]:
    """For each request: (sum of continuation log-probs, whether every continuation token was the argmax).

    Contexts longer than the model's context (`max_len`, default the model's max_seq_len) are cut from the left.
    """
    for i, r in enumerate(requests):
        _check(r, i)
    device = model_device(model)
    max_len = max_len or max_seq_len(model)
    seqs = []
    for i, (ctx, cont) in enumerate(requests):
        seq = list(ctx) + list(cont)
        if max_len is not None:
            if len(cont) > max_len:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the context {max_len}")
            seq = seq[-(max_len + 1):]
        seqs.append((seq, len(cont)))
    # Longest first: similar lengths share a batch, and an out-of-memory shows up on the first batch.
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    results: List[Optional[Tuple[float, bool]]] = [None] * len(seqs)
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    # Under torch.distributed every rank makes the same number of forwards of the same shape (the busiest
    # rank's): a sharded model (FSDP, memory-parallel lookups that all-gather tokens) runs collectives inside
    # forward. Single-process this is a no-op.
    n_batches = all_max(len(groups), device=device)
    was_training = model.training
    model.eval()
    try:
        for b in range(n_batches):
            idx = groups[b] if b < len(groups) else []
            width = max((len(seqs[i][0]) - 1 for i in idx), default=1)
            rows, width = all_max(max(len(idx), 1), width, device=device)
            inputs = torch.zeros(rows, width, dtype=torch.long)
            for row, i in enumerate(idx):
                seq = seqs[i][0]
                inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
            with autocast(device, amp_dtype):
                logits = model(inputs.to(device))
            if not idx:
                continue
            # log-softmax only at the continuation positions: the full [B, L, vocab] would be large.
            spans = [(len(seqs[i][0]) - 1 - seqs[i][1], len(seqs[i][0]) - 1) for i in idx]
            logp = torch.log_softmax(torch.cat([logits[row, a:b] for row, (a, b) in enumerate(spans)]).float(), dim=-1)
            target = torch.tensor([t for i in idx for t in seqs[i][0][-seqs[i][1]:]], dtype=torch.long, device=device)
            tok_lp = logp.gather(-1, target[:, None]).squeeze(-1)
            hit = logp.argmax(-1) == target
            ends = torch.tensor([b - a for a, b in spans], device=device).cumsum(0).tolist()
            tok_lp, hit = tok_lp.double().cpu(), hit.cpu()  # one transfer per batch
            start = 0
            for i, end in zip(idx, ends):
                results[i] = (float(tok_lp[start:end].sum()), bool(hit[start:end].all()))
                start = end
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]

