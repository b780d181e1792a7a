"""Evaluation: validation NLL / bits per byte, QA tasks (generative and multiple-choice), KV-cached generation,
log-likelihood scoring, synthetic facts, and an lm-evaluation-harness adapter.

For training (train calls these; eval never imports train):

    from eval import EvalConfig, load_eval_tasks, run_tasks, format_table, flatten
    tasks = load_eval_tasks(cfg.eval)                     # once, at startup (reads the jsonl files)
    if cfg.eval.tasks and step % cfg.eval.every == 0:     # every rank calls it
        results = run_tasks(model, tokenizer, cfg.eval, step=step, tasks=tasks, amp_dtype=rt.dtype,
                            out_path=os.path.join(run_dir, "eval.jsonl"))
        log.log({"step": step, **flatten(results)})      # keys eval/<task>/<metric>
        log.print(format_table(results))

    from eval import fixed_val_batches, validation_metrics
    val = fixed_val_batches(cfg.data, tokenizer, n_batches, batch_size, rank=dp_rank, world_size=dp_size)  # once
    metrics = validation_metrics(model, val, tokenizer, amp_dtype)   # {"val/loss", "val/bpb", "val/<src>/loss", ...}

Standalone: `python -m eval checkpoint=RUN_OR_CKPT_DIR tasks=[qa_wikidata,synthetic:DIR] key=value ...`.
"""
from .config import EvalConfig
from .generate import generate_text, generate_tokens
from .metrics import exact_match, normalize_answer, token_f1
from .results import flatten, format_table
from .sinks import write_jsonl
from .runner import load_eval_tasks, run_tasks
from .scoring import continuation_logprobs
from .validation import fixed_val_batches, validation_metrics, validation_nll

__all__ = [
    "EvalConfig", "run_tasks", "load_eval_tasks", "format_table", "flatten", "write_jsonl",
    "validation_metrics", "validation_nll", "fixed_val_batches", "continuation_logprobs",
    "generate_text", "generate_tokens", "exact_match", "token_f1", "normalize_answer",
]
