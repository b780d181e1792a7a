"""Turning (context, continuation) strings into token requests, consistently for scoring and generation.

Contexts start with BOS when the tokenizer has one (as training documents do); a tokenizer without BOS uses
EOS as the document separator in front. The continuation's tokens are those that encoding the whole string
adds after the context's tokens (so a word split across the boundary is tokenized as in running text); when
the context's tokens are not a prefix of the whole, the two are encoded separately.
"""
from __future__ import annotations

from typing import List, Optional, Tuple


def _valid(i) -> bool:
    return isinstance(i, int) and i >= 0


def prefix_tokens(tokenizer, add_bos: bool = True) -> List[int]:
    if not add_bos:
        return []
    bos = getattr(tokenizer, "bos_id", None)
    if _valid(bos):
        return [bos]
    eos = getattr(tokenizer, "eos_id", None)
    return [eos] if _valid(eos) else []


def prefix_id(tokenizer) -> int:
    """The token that stands before a document (for scoring its first token)."""
    p = prefix_tokens(tokenizer, True)
    if not p:
        raise ValueError("tokenizer has neither bos_id nor eos_id: cannot score the first token of a text")
    return p[0]


def encode_context(tokenizer, context: str, add_bos: bool = True) -> List[int]:
    return prefix_tokens(tokenizer, add_bos) + list(tokenizer.encode(context))


def encode_request(tokenizer, context: str, continuation: str, add_bos: bool = True) -> Tuple[List[int], List[int]]:
    # Trailing spaces of the context belong to the continuation (" Paris", not "is " + "Paris").
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context = stripped
    ctx = list(tokenizer.encode(context)) if context else []
    whole = list(tokenizer.encode(context + continuation))
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx):]
    else:
        cont = list(tokenizer.encode(continuation))
    prefix = prefix_tokens(tokenizer, add_bos)
    if not prefix and not ctx:
        prefix = [prefix_id(tokenizer)]
    return prefix + ctx, cont


def trim_at_stop(text: str, stop: Optional[List[str]]) -> Tuple[str, bool]:
    """Cut `text` at the earliest stop string; returns (text, whether one was found)."""
    cut = len(text)
    for s in stop or []:
        if s:
            j = text.find(s)
            if 0 <= j < cut:
                cut = j
    return text[:cut], cut < len(text)
