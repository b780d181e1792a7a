"""`python -m eval checkpoint=DIR tasks=[qa_wikidata,synthetic:DIR] key=value ...` (also under torchrun).

DIR is a checkpoint (runs/X/checkpoints/step_N) or a run directory (its newest checkpoint). Keys: every field of
EvalConfig (tasks, max_examples, num_fewshot, ...) plus those of EvalCLIConfig below. Prints a table, appends
records to `out` (default <run dir>/eval.jsonl), logs to wandb when wandb=online|offline.
With val_batches=N > 0 it also reports validation NLL / bits per byte on the run's val sources (config.yaml).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional

from model.cli_config import (ConfigError, Device, Precision, WandbMode, check_choices, describe_keys,
                              load_structured, wants_help)

from .config import EvalConfig
from .run_files import data_config, resolve_tokenizer, run_dir_of


@dataclass
class EvalCLIConfig(EvalConfig):
    checkpoint: str = ""
    tokenizer: Optional[str] = None  # default: <run dir>/tokenizer.model, else data.tokenizer of <run dir>/config.yaml
    device: Device = "auto"
    precision: Precision = "auto"
    out: Optional[str] = None  # results jsonl; default <run dir>/eval.jsonl
    val_batches: int = 0  # > 0: also validation NLL/bpb over this many batches per val source
    val_batch_size: int = 8
    wandb: WandbMode = "disabled"
    project: str = "mnemo"

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if not self.checkpoint:
            raise ValueError(f"{p}checkpoint: required (a checkpoint or run directory)")
        check_choices(self, prefix)
        if self.val_batches < 0 or self.val_batch_size < 1:
            raise ValueError(f"{p}val_batches/val_batch_size: must be >= 0 / >= 1")
        if not self.tasks and not self.val_batches:
            raise ValueError(f"{p}tasks: nothing to do; give tasks=[...] and/or val_batches=N")
        EvalConfig.validate(self, prefix)


def parse_cli(argv: List[str]) -> EvalCLIConfig:
    cfg = load_structured(EvalCLIConfig, None, argv, example="tasks=[jsonl:qa.jsonl] checkpoint=runs/x")
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def usage() -> str:
    return __doc__ + "\nKeys and defaults:\n" + "\n".join(describe_keys(EvalCLIConfig)) + "\n"


def main(argv=None) -> int:
    import torch
    import torch.distributed as dist

    from model import prepare_memory_kernels
    from model.checkpoint import load_model, resolve_checkpoint
    from model.device import pick_device, pick_dtype

    from .results import flatten, format_table
    from .sinks import WandbSink, write_jsonl
    from .runner import load_eval_tasks, run_tasks
    from .validation import fixed_val_batches, validation_metrics

    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(usage())
        return 0
    try:
        cfg = parse_cli(argv)
        device = pick_device(cfg.device)
        ckpt = resolve_checkpoint(cfg.checkpoint)
        run_dir = run_dir_of(ckpt)
        tokenizer = resolve_tokenizer(cfg.tokenizer, run_dir)
        tasks = load_eval_tasks(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:  # each rank holds the whole model and takes a share of the examples
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    amp = pick_dtype(cfg.precision, device)
    try:
        model, _ = load_model(ckpt, device)
        note = prepare_memory_kernels(model.cfg, device, amp, backward=False)  # evaluation runs no backward
        if note and rank == 0:
            print(note)
        with open(os.path.join(ckpt, "meta.json")) as f:
            step = json.load(f).get("step")
        out = cfg.out or os.path.join(run_dir, "eval.jsonl")
        results = run_tasks(model, tokenizer, cfg, step=step, tasks=tasks, amp_dtype=amp, out_path=out)
        val = {}
        if cfg.val_batches:
            batches = fixed_val_batches(data_config(run_dir), tokenizer, cfg.val_batches, cfg.val_batch_size, rank, world)
            val = validation_metrics(model, batches, tokenizer, amp)
        if rank == 0:
            print(f"checkpoint {ckpt} (step {step})")
            if results:
                print(format_table(results))
            for k, v in val.items():
                print(f"{k} {v:.4f}")
            if val:
                write_jsonl(out, [{"step": step, "task": "val", **val}])
            print(f"results appended to {out}")
            sink = WandbSink(cfg.wandb, cfg.project, name=os.path.basename(run_dir), config=asdict(cfg),
                             job_type="eval")
            sink.log({**flatten(results), **val}, step=step)
            sink.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
