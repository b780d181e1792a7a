"""Synthetic facts: fictional people with attributes, as paraphrased training documents plus QA with new wordings.

A model can only answer these questions by having stored the facts during training (the entities do not exist),
and the QA prompts use wordings that never appear in the documents, so answering needs the fact, not the
sentence. This is the small-scale test of memory layers against dense models.

    python -m eval.synthetic_facts --out DIR --n-entities N --seed S [--docs-per-entity K] [--qa-fraction F]

writes DIR/train.jsonl and DIR/val.jsonl ({"text"} documents), DIR/qa.jsonl ({"prompt", "answers"} generative),
DIR/mc.jsonl ({"prompt", "choices", "label"}, 4 choices) and DIR/meta.json. Same arguments -> same bytes.

With --qa-fraction F > 0 the first F of the people also get question-answer training documents (one per
attribute and training question wording, "<question> <answer>"), as in knowledge-extraction studies: a model
can learn the QA format from them and then has to apply it to the people it saw only in biographies. Two more
generative files split the evaluation:
- DIR/qa_trained.jsonl: people whose QA was in training, asked in a trained wording (was the pair stored?);
- DIR/qa_prose.jsonl: the other people, seen only in biographies, asked in held-out wordings (QA_TEMPLATES,
  never in training) (can the fact be extracted from prose?).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Dict, List, Sequence, Tuple

_ONSETS = ["b", "br", "d", "dr", "f", "g", "k", "kl", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m"]
_CITY_SUFFIX = ["ford", "haven", "mere", "holm", "gard", "wick", "stad", "port"]
_COMPANY_SUFFIX = ["Works", "Foundry", "Labs", "Guild", "Company", "Mills"]
_OCCUPATIONS = [
    "astronomer", "baker", "cartographer", "chemist", "glassblower", "architect", "violinist", "beekeeper",
    "surgeon", "librarian", "sculptor", "botanist", "shipwright", "translator", "geologist", "clockmaker",
]
_LANGUAGES = ["Velorian", "Quennish", "Tharic", "Ostrav", "Melindi", "Corvasi", "Drunnic", "Salvene"]

ATTRIBUTES = ["city", "occupation", "year", "company", "language"]

# Wordings for the training documents ({n}: name, {v}: value).
TRAIN_TEMPLATES: Dict[str, List[str]] = {
    "city": ["{n} was born in {v}.", "{v} is the birthplace of {n}.", "Born in {v}, {n} grew up there.",
             "The hometown of {n} is {v}."],
    "occupation": ["{n} works as a {v}.", "By profession, {n} is a {v}.", "{n} earns a living as a {v}.",
                   "Everyone knows {n} as a {v}."],
    "year": ["{n} was born in the year {v}.", "The birth year of {n} is {v}.", "{n} came into the world in {v}.",
             "In {v}, {n} was born."],
    "company": ["{n} is employed by {v}.", "{v} employs {n}.", "{n} has a job at {v}.",
                "The employer of {n} is {v}."],
    "language": ["{n} speaks {v}.", "The native tongue of {n} is {v}.", "{n} grew up speaking {v}.",
                 "At home, {n} talks in {v}."],
}
# Held-out wordings for QA (completion style, like qa_wikidata): never used in the documents.
QA_TEMPLATES: Dict[str, List[str]] = {
    "city": ["The city where {n} was born is", "{n}'s place of birth is"],
    "occupation": ["The profession of {n} is", "{n}'s occupation is that of a"],
    "year": ["{n}'s year of birth is", "The year in which {n} was born is"],
    "company": ["The company that {n} works for is", "{n}'s workplace is"],
    "language": ["The language {n} speaks natively is", "{n}'s first language is"],
}
# Question wordings of the QA training documents (--qa-fraction): distinct from both lists above.
QA_TRAIN_TEMPLATES: Dict[str, List[str]] = {
    "city": ["{n} was born in the city of", "The town that {n} comes from is"],
    "occupation": ["{n} has the job of a", "The line of work of {n} is that of a"],
    "year": ["{n}'s birth took place in the year", "The year that saw the birth of {n} is"],
    "company": ["The employer that {n} works at is", "{n} draws a salary from"],
    "language": ["The mother tongue of {n} is", "{n} is a native speaker of"],
}


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return w.capitalize()


def _unique(make, n: int, rng: random.Random) -> List[str]:
    seen, out = set(), []
    for _ in range(n * 100):
        w = make(rng)
        if w not in seen:
            seen.add(w)
            out.append(w)
            if len(out) == n:
                return out
    raise ValueError(f"could not make {n} distinct names; ask for fewer entities")


def make_entities(n_entities: int, seed: int) -> Tuple[List[Dict[str, str]], Dict[str, List[str]]]:
    """n fictional people, each {"name", "city", "occupation", "year", "company", "language"}, and the value
    pool of each attribute (multiple-choice distractors come from it)."""
    if n_entities < 1:
        raise ValueError(f"--n-entities: must be >= 1, got {n_entities}")
    rng = random.Random(seed)
    n_pool = max(8, n_entities // 4)  # values repeat across people, as real attributes do
    cities = _unique(lambda r: _word(r, 2) + r.choice(_CITY_SUFFIX), n_pool, rng)
    companies = _unique(lambda r: _word(r, 2) + " " + r.choice(_COMPANY_SUFFIX), n_pool, rng)
    names = _unique(lambda r: _word(r, r.choice([1, 2])) + " " + _word(r, 2), n_entities, rng)
    pools = {"city": cities, "occupation": _OCCUPATIONS, "company": companies, "language": _LANGUAGES,
             "year": [str(y) for y in range(1700, 2000)]}
    return [{"name": name, **{a: rng.choice(pools[a]) for a in ATTRIBUTES}} for name in names], pools


def render_document(entity: Dict[str, str], rng: random.Random) -> str:
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    return " ".join(rng.choice(TRAIN_TEMPLATES[a]).format(n=entity["name"], v=entity[a]) for a in attrs)


def _distractors(value: str, pool: Sequence[str], k: int, rng: random.Random) -> List[str]:
    others = sorted(set(pool) - {value})
    return rng.sample(others, k)


def qa_split(entities: List[Dict[str, str]], qa_fraction: float, seed: int):
    """QA training documents for the first qa_fraction of the people, and the two evaluation sets."""
    rng = random.Random(seed + 2)  # its own stream: the files of qa_fraction 0 stay byte-identical
    n_qa = round(len(entities) * qa_fraction)
    docs, trained, prose = [], [], []
    for e in entities[:n_qa]:
        for a in ATTRIBUTES:
            docs += [{"text": f"{q.format(n=e['name'])} {e[a]}"} for q in QA_TRAIN_TEMPLATES[a]]
            prompt = rng.choice(QA_TRAIN_TEMPLATES[a]).format(n=e["name"])
            trained.append({"id": len(trained), "prompt": prompt, "answers": [e[a]], "entity": e["name"], "attribute": a})
    for e in entities[n_qa:]:
        for a in ATTRIBUTES:
            prompt = rng.choice(QA_TEMPLATES[a]).format(n=e["name"])
            prose.append({"id": len(prose), "prompt": prompt, "answers": [e[a]], "entity": e["name"], "attribute": a})
    return docs, trained, prose


def generate(out_dir: str, n_entities: int, seed: int, docs_per_entity: int = 3,
             qa_fraction: float = 0.0) -> Dict[str, int]:
    if docs_per_entity < 1:
        raise ValueError(f"--docs-per-entity: must be >= 1, got {docs_per_entity}")
    if not 0 <= qa_fraction < 1:
        raise ValueError(f"--qa-fraction: must be in [0, 1) (some people must be seen only in prose), got {qa_fraction}")
    entities, pools = make_entities(n_entities, seed)
    rng = random.Random(seed + 1)
    docs = [{"text": render_document(e, rng)} for e in entities for _ in range(docs_per_entity)]
    rng.shuffle(docs)
    extra: Dict[str, list] = {}
    if qa_fraction > 0:
        qa_docs, extra["qa_trained.jsonl"], extra["qa_prose.jsonl"] = qa_split(entities, qa_fraction, seed)
        docs += qa_docs
        random.Random(seed + 3).shuffle(docs)  # `rng` goes on to the other files exactly as without QA documents
    # Validation text: fresh paraphrases of a few entities (same facts, so it measures fitting the documents).
    val = [{"text": render_document(e, rng)} for e in entities[: max(1, n_entities // 20)]]
    # Distractors are values other people in the set have (seen in training), so a model cannot reject them
    # merely for being unfamiliar; the whole pool is used only when too few distinct values are in use.
    used = {a: sorted({e[a] for e in entities}) for a in ATTRIBUTES}
    choice_pools = {a: used[a] if len(used[a]) >= 4 else pools[a] for a in ATTRIBUTES}
    qa, mc = [], []
    for e in entities:
        for a in ATTRIBUTES:
            prompt = rng.choice(QA_TEMPLATES[a]).format(n=e["name"])
            qa.append({"id": len(qa), "prompt": prompt, "answers": [e[a]], "entity": e["name"], "attribute": a})
            choices = _distractors(e[a], choice_pools[a], 3, rng) + [e[a]]
            rng.shuffle(choices)
            mc.append({"id": len(mc), "prompt": prompt, "choices": choices, "label": choices.index(e[a]),
                       "entity": e["name"], "attribute": a})
    os.makedirs(out_dir, exist_ok=True)
    files = {"train.jsonl": docs, "val.jsonl": val, "qa.jsonl": qa, "mc.jsonl": mc, **extra}
    for fname, rows in files.items():
        with open(os.path.join(out_dir, fname), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {"entities": n_entities, "train_docs": len(docs), "val_docs": len(val), "qa": len(qa), "mc": len(mc)}
    counts.update({fname.split(".")[0]: len(rows) for fname, rows in extra.items()})
    meta = {"seed": seed, "docs_per_entity": docs_per_entity, **({"qa_fraction": qa_fraction} if extra else {}), **counts}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.synthetic_facts", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-entities", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs-per-entity", type=int, default=3)
    p.add_argument("--qa-fraction", type=float, default=0.0, help="share of people with QA training documents")
    args = p.parse_args(argv)
    try:
        counts = generate(args.out, args.n_entities, args.seed, args.docs_per_entity, args.qa_fraction)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
