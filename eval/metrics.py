"""Answer normalisation and QA metrics: exact match, token F1 (best over the gold answers), multiple choice.

Normalisation follows the usual SQuAD/TriviaQA convention: lower case, drop punctuation, drop the articles
a/an/the, collapse whitespace. Both prediction and answers go through it before comparison.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0."""
    _check_answers(answers)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list, gold_tokens: list) -> float:
    if not pred_tokens or not gold_tokens:
        # Both empty counts as a match (an answer that normalises to nothing, e.g. "the").
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Bag-of-tokens F1 between normalised prediction and answer, best over the answers."""
    _check_answers(answers)
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(a).split()) for a in answers)


def choice_correct(logliks: Sequence[float], label: int) -> float:
    """Accuracy of one multiple-choice item: the highest log-likelihood wins; ties go to the lower index."""
    best = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    return float(best == label)


def choice_correct_norm(logliks: Sequence[float], choices: Sequence[str], label: int) -> float:
    """Length-normalised accuracy: log-likelihood per UTF-8 byte of the choice text (independent of the tokenizer)."""
    normed = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(logliks, choices)]
    return choice_correct(normed, label)


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
