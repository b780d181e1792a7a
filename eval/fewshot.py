"""k-shot prompts: solved examples drawn from the same task, placed before the question.

Shots come from the other examples of the task (never the example itself), chosen by a seeded RNG keyed on
(seed, example index), so a prompt does not depend on which other examples are evaluated or in what order.
"""
from __future__ import annotations

import random
from typing import List, Sequence

from .tasks import Example

TARGET_DELIMITER = " "  # between a prompt and its answer/choice
FEWSHOT_DELIMITER = "\n"  # between solved examples; also the generation stop string for QA


def gold_text(ex: Example) -> str:
    return ex.answers[0] if ex.answers else ex.choices[ex.label]


def shot_indices(n_examples: int, index: int, k: int, seed: int) -> List[int]:
    if k <= 0:
        return []
    if n_examples - 1 < k:
        raise ValueError(f"eval.num_fewshot: {k} shots need at least {k + 1} examples in the task, got {n_examples}")
    rng = random.Random(seed * 1_000_003 + index)
    others = rng.sample(range(n_examples - 1), k)
    # Skip over `index` without building a list of all the other indices.
    return [i if i < index else i + 1 for i in others]


def build_prompt(examples: Sequence[Example], index: int, k: int, seed: int) -> str:
    """The prompt for examples[index] with k solved shots from the other examples in front."""
    parts = [examples[i].prompt + TARGET_DELIMITER + gold_text(examples[i]) for i in shot_indices(len(examples), index, k, seed)]
    parts.append(examples[index].prompt)
    return FEWSHOT_DELIMITER.join(parts)
