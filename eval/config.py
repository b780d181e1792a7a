"""Evaluation settings, shared by periodic evaluation in training (`eval` section of the train config) and
`python -m eval`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from .tasks import check_task_spec


@dataclass
class EvalConfig:
    # Task names: qa_wikidata | synthetic:DIR | jsonl:PATH (see eval/tasks.py). Empty: no QA evaluation.
    tasks: List[str] = field(default_factory=list)
    every: int = 0  # training steps between QA evaluations; 0: only at the end of training (when tasks are set)
    max_examples: int = 200  # per task, the first N of the file (0: all); keeps periodic eval cheap
    batch_size: int = 16  # sequences per forward (scoring) / prompts per generation batch
    num_fewshot: int = 0  # solved examples from the same task in front of each prompt
    max_new_tokens: int = 16  # generation budget for generative QA
    stop: List[str] = field(default_factory=lambda: ["\n"])  # generation ends at the first of these
    seed: int = 0  # few-shot draw (and sampling, when temperature > 0)
    temperature: float = 0.0  # 0: greedy decoding (the QA default)
    top_p: float = 1.0
    generate: bool = True  # generative tasks: also decode and score EM/F1 (False: answer NLL only, faster)
    add_bos: bool = True  # prompts start with BOS, as training documents do
    # The qa_wikidata file is evaluation-only data that mnemo does not ship: the task needs this path (relative
    # paths: against the repo root).
    qa_wikidata_path: str = ""

    def validate(self, prefix: str) -> None:
        def key(name: str) -> str:  # "eval.tasks" in the train config, "tasks" on the eval command line
            return f"{prefix}.{name}" if prefix else name

        if not isinstance(self.tasks, (list, tuple)) or any(not isinstance(t, str) for t in self.tasks):
            raise ValueError(f"{key('tasks')}: must be a list of task names, got {self.tasks!r}")
        for i, t in enumerate(self.tasks):
            problem = check_task_spec(t)
            if problem:
                raise ValueError(f"{key('tasks')}[{i}]: {problem}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"{key('tasks')}: listed twice: {sorted({t for t in self.tasks if self.tasks.count(t) > 1})}")
        for name, low in (("every", 0), ("max_examples", 0), ("batch_size", 1), ("num_fewshot", 0), ("max_new_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{key(name)}: must be an integer >= {low}, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"{key('temperature')}: must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{key('top_p')}: must be in (0, 1], got {self.top_p}")
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"{key('stop')}: must be a list of non-empty strings, got {self.stop!r}")
        if "qa_wikidata" in self.tasks and not self.qa_wikidata_path:
            raise ValueError(f"{key('qa_wikidata_path')}: the qa_wikidata task needs the path of qa_wikidata.jsonl "
                             f"(evaluation-only data, not part of mnemo), e.g. {key('qa_wikidata_path')}=/data/qa_wikidata.jsonl")
