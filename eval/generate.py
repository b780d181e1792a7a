"""Batched generation with the model's KV cache: greedy, temperature and top-p sampling, stop tokens and strings.

Prompts of different lengths are left-padded into one batch. Each row's RoPE positions count only its real
tokens (`positions`), and padded keys are masked out (`key_valid`), so a row decodes exactly as it would alone.
Memory layers are per token and need no cache.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from model.device import autocast

from .device import all_max, all_true, max_seq_len, model_device
from .text import encode_context, trim_at_stop


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, V] logits -> [B] token ids. temperature 0 is greedy (argmax, lowest id on ties)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token is always kept).
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    should_stop: Optional[Callable[[int, List[int]], bool]] = None,
    seed: int = 0,
    amp_dtype: Optional[torch.dtype] = None,
    pad_id: int = 0,
) -> List[List[int]]:
    """Generate up to max_new_tokens after each prompt. A row stops after emitting a token in `stop_ids`
    (the stop token is kept) or when should_stop(row, generated_tokens) is true. Returns the new tokens.

    Greedy output does not depend on how prompts are batched; sampled output is reproducible for the same
    seed and batch, but rows draw from one generator, so a different batching draws different samples."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = model_device(model)
    limit = max_seq_len(model)
    if limit is not None:
        if max_new_tokens >= limit:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context {limit}")
        prompts = [list(p)[-(limit - max_new_tokens):] for p in prompts]
    n_real = len(prompts)
    # Under torch.distributed all ranks decode batches of one shape in lockstep (a sharded model runs
    # collectives in forward): pad with one-token dummy rows up to the largest batch and prompt of any rank.
    B, P = all_max(max(n_real, 1), max((len(p) for p in prompts), default=1), device=device)
    prompts = list(prompts) + [[pad_id]] * (B - n_real)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        valid[i, P - len(p):] = True
    tokens, valid = tokens.to(device), valid.to(device)
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    cache_dtype = amp_dtype or next(model.parameters()).dtype
    cache = model.make_kv_cache(B, P + max_new_tokens, device=device, dtype=cache_dtype)
    stop_set = set(int(s) for s in stop_ids)
    out: List[List[int]] = [[] for _ in range(B)]
    done = [i >= n_real for i in range(B)]
    was_training = model.training
    model.eval()
    try:
        with autocast(device, amp_dtype):
            logits = model(tokens, cache=cache, start_pos=0, positions=positions, key_valid=valid)
        for t in range(max_new_tokens):
            nxt = sample_next(logits[:, -1].float(), temperature, top_p, generator)
            for i, tok in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                out[i].append(tok)
                if tok in stop_set or (should_stop is not None and should_stop(i, out[i])):
                    done[i] = True
            if t == max_new_tokens - 1 or all_true(all(done), device):
                break
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
            with autocast(device, amp_dtype):
                logits = model(nxt[:, None], cache=cache, start_pos=P + t, positions=(lens + t)[:, None], key_valid=valid)
    finally:
        model.train(was_training)
    return out[:n_real]


def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Optional[List[str]] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    add_bos: bool = True,
    amp_dtype: Optional[torch.dtype] = None,
) -> List[str]:
    """Generate a completion for each prompt string; each is cut before the first stop string and EOS."""
    encoded = [encode_context(tokenizer, p, add_bos) for p in prompts]
    eos = getattr(tokenizer, "eos_id", None)
    stop_ids = [eos] if isinstance(eos, int) and eos >= 0 else []
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts: List[Optional[str]] = [None] * len(encoded)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]

        def hit_stop(row: int, toks: List[int]) -> bool:
            return bool(stop) and trim_at_stop(tokenizer.decode(toks), stop)[1]

        gen = generate_tokens(
            model, [encoded[i] for i in idx], max_new_tokens, temperature=temperature, top_p=top_p,
            stop_ids=stop_ids, should_stop=hit_stop, seed=seed + b, amp_dtype=amp_dtype,
        )
        for i, toks in zip(idx, gen):
            toks = [t for t in toks if t not in stop_ids]
            texts[i] = trim_at_stop(tokenizer.decode(toks), stop)[0]
    return texts  # type: ignore[return-value]
