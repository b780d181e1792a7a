"""QA tasks from jsonl files, and the task names that the eval config accepts.

Two record formats (one JSON object per line):
- generative:      {"prompt": str, "answers": [str, ...]}          -> exact match, token F1, answer NLL
- multiple-choice: {"prompt": str, "choices": [str, ...], "label": int} -> accuracy, length-normalised accuracy
Extra keys (ids, entity names, ...) are kept in `meta`. A file must hold one format only.

Task names (EvalConfig.tasks):
- `qa_wikidata`      the BIG-bench QA set (evaluation only, not shipped): its path is EvalConfig.qa_wikidata_path
- `synthetic:DIR`    a directory written by `python -m eval.synthetic_facts` (its qa.jsonl and mc.jsonl)
- `jsonl:PATH`       any jsonl file in one of the two formats (the task is named after the file)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from data.config import resolve_path  # relative paths: against the repo root, as data paths are

GENERATIVE = "generative"
MULTIPLE_CHOICE = "multiple_choice"


@dataclass
class Example:
    prompt: str
    answers: List[str] = field(default_factory=list)  # generative
    choices: List[str] = field(default_factory=list)  # multiple-choice
    label: int = -1  # multiple-choice
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    name: str
    kind: str  # GENERATIVE | MULTIPLE_CHOICE
    examples: List[Example]
    path: str = ""


def _fail(path: str, lineno: int, what: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: {what}")


def _parse_record(obj: Any, path: str, lineno: int) -> Example:
    if not isinstance(obj, dict):
        raise _fail(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise _fail(path, lineno, 'missing or non-string "prompt"')
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "answers", "choices", "label")}
    if "answers" in obj:
        answers = obj["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise _fail(path, lineno, '"answers" must be a non-empty list of strings')
        return Example(prompt=prompt, answers=list(answers), meta=meta)
    if "choices" in obj:
        choices, label = obj["choices"], obj.get("label")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise _fail(path, lineno, '"choices" must be a list of at least two strings')
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise _fail(path, lineno, f'"label" must be an int in [0, {len(choices)}), got {label!r}')
        return Example(prompt=prompt, choices=list(choices), label=label, meta=meta)
    raise _fail(path, lineno, 'record needs "answers" (generative) or "choices"+"label" (multiple-choice)')


def load_jsonl_task(path: str, name: Optional[str] = None, max_examples: int = 0) -> Task:
    """Read a QA jsonl file. `max_examples` > 0 keeps the first that many (file order: deterministic)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval task file not found: {path}")
    examples: List[Example] = []
    kind = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(path, lineno, f"invalid JSON ({e.msg})") from None
            ex = _parse_record(obj, path, lineno)
            ex_kind = GENERATIVE if ex.answers else MULTIPLE_CHOICE
            if kind is None:
                kind = ex_kind
            elif ex_kind != kind:
                raise _fail(path, lineno, f"{ex_kind} record in a {kind} file (one format per file)")
            examples.append(ex)
            if max_examples and len(examples) >= max_examples:
                break
    if not examples:
        raise ValueError(f"{path}: no examples")
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    return Task(name=name, kind=kind, examples=examples, path=path)


def check_task_spec(spec: str) -> Optional[str]:
    """None when `spec` is a well-formed task name, else what is wrong (used by EvalConfig.validate)."""
    if spec == "qa_wikidata":
        return None
    for prefix in ("synthetic:", "jsonl:"):
        if spec.startswith(prefix):
            return None if spec[len(prefix):] else f"{prefix} needs a path after the colon"
    return f"unknown task {spec!r}; allowed: qa_wikidata, synthetic:DIR, jsonl:PATH"


def load_tasks(spec: str, qa_wikidata_path: str, max_examples: int = 0) -> List[Task]:
    """One task name -> the tasks it stands for (synthetic:DIR gives a generative and a multiple-choice task)."""
    problem = check_task_spec(spec)
    if problem:
        raise ValueError(f"eval.tasks: {problem}")
    if spec == "qa_wikidata":
        if not qa_wikidata_path:
            raise ValueError("qa_wikidata_path: the qa_wikidata task needs the path of qa_wikidata.jsonl "
                             "(evaluation-only data, not part of mnemo)")
        path = resolve_path(qa_wikidata_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"qa_wikidata_path: {path} not found (give the path of qa_wikidata.jsonl)")
        return [load_jsonl_task(path, "qa_wikidata", max_examples)]
    if spec.startswith("synthetic:"):
        root = resolve_path(spec[len("synthetic:"):])
        if not os.path.isdir(root):
            raise FileNotFoundError(f"eval.tasks: {spec}: directory {root} not found (make it with python -m eval.synthetic_facts)")
        tasks = []
        for fname, suffix in (("qa.jsonl", "qa"), ("mc.jsonl", "mc")):
            p = os.path.join(root, fname)
            if os.path.isfile(p):
                tasks.append(load_jsonl_task(p, f"synthetic_{suffix}", max_examples))
        if not tasks:
            raise FileNotFoundError(f"eval.tasks: {spec}: neither qa.jsonl nor mc.jsonl in {root}")
        return tasks
    return [load_jsonl_task(resolve_path(spec[len("jsonl:"):]), None, max_examples)]
