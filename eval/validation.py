"""Validation NLL and bits per byte over a fixed set of batches, per validation source, summed across ranks.

The batches are drawn once (`fixed_val_batches`) and reused at every evaluation, so numbers are comparable
across steps. Bits per byte divides the summed NLL (converted to bits) by the UTF-8 bytes the target tokens
decode to, so models with different tokenizers can be compared.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from model.device import autocast

from .device import all_max, all_reduce_sum, model_device


def source_name(src) -> str:
    """A short name for a data source: its first path's file name without extensions."""
    if getattr(src, "paths", None):
        base = os.path.basename(src.paths[0].rstrip("/*")) or src.paths[0]
        return base.split(".")[0] or base
    return getattr(src, "hf_name", None) or "val"


def fixed_val_batches(data_cfg, tokenizer, n_batches: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Dict[str, List[torch.Tensor]]:
    """The first `n_batches` validation batches of each val source: {source name: [LongTensor [B, seq_len+1]]}.

    Each rank gets its own slice of the documents (the loader shards by rank). A source too short for one
    batch on this rank maps to an empty list (it still takes part in the cross-rank sum).
    """
    from data import build_loader  # data is a dependency of eval; imported here so metrics need no data

    out: Dict[str, List[torch.Tensor]] = {}
    for src in data_cfg.val:
        name = source_name(src)
        if name in out:  # two sources with the same file name
            name = f"{name}_{len(out)}"
        cfg = dataclasses.replace(data_cfg, val=[src])
        loader = build_loader(cfg, tokenizer, split="val", rank=rank, world_size=world_size, batch_size=batch_size)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) >= n_batches:
                break
        out[name] = batches
    return out


def count_bytes(targets: torch.Tensor, tokenizer) -> int:
    """UTF-8 bytes of the text that each row of target tokens decodes to (special tokens decode to nothing)."""
    return sum(len(tokenizer.decode(row).encode("utf-8")) for row in targets.tolist())


@torch.no_grad()
def validation_nll(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    tokenizer=None,
    amp_dtype: Optional[torch.dtype] = None,
    n_bytes: Optional[int] = None,
) -> Dict[str, float]:
    """{"loss": nats/token, "bpb": bits/byte, "tokens", "bytes"} over `batches` ([B, L+1] each), summed over
    ranks when torch.distributed is initialised (every rank must call this, with the same number of batches
    when the model is sharded). `bpb` is present when a tokenizer (or n_bytes, this rank's byte count) is given."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tok, byte_count = 0, 0
    # Under torch.distributed every rank runs the same number of forwards of the same shape (a sharded model
    # runs collectives in forward); padding rows/columns carry target -100 and are not counted.
    n_batches = all_max(len(batches), device=device)
    try:
        for b in range(n_batches):
            batch = batches[b].to(device) if b < len(batches) else torch.zeros(1, 2, dtype=torch.long, device=device)
            rows, width = all_max(batch.shape[0], batch.shape[1], device=device)
            inputs = torch.zeros(rows, width - 1, dtype=torch.long, device=device)
            targets = torch.full((rows, width - 1), -100, dtype=torch.long, device=device)
            if b < len(batches):
                inputs[: batch.shape[0], : batch.shape[1] - 1] = batch[:, :-1]
                targets[: batch.shape[0], : batch.shape[1] - 1] = batch[:, 1:]
                n_tok += batch[:, 1:].numel()
                if tokenizer is not None and n_bytes is None:
                    byte_count += count_bytes(batch[:, 1:].cpu(), tokenizer)
            with autocast(device, amp_dtype):
                logits = model(inputs)
            nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum").double()
    finally:
        model.train(was_training)
    if n_bytes is not None:
        byte_count = n_bytes
    sums = all_reduce_sum(torch.stack([nll, torch.tensor(float(n_tok), dtype=torch.float64, device=device),
                                       torch.tensor(float(byte_count), dtype=torch.float64, device=device)]))
    total_nll, total_tok, total_bytes = (float(x) for x in sums.tolist())
    out = {"loss": total_nll / total_tok if total_tok else float("nan"), "tokens": int(total_tok)}
    if tokenizer is not None or n_bytes is not None:
        out["bytes"] = int(total_bytes)
        out["bpb"] = total_nll / math.log(2) / total_bytes if total_bytes else float("nan")
    return out


def validation_metrics(
    model: torch.nn.Module,
    batches_by_source: Dict[str, Sequence[torch.Tensor]],
    tokenizer=None,
    amp_dtype: Optional[torch.dtype] = None,
) -> Dict[str, float]:
    """Flat metrics for logging: {"val/<source>/loss", "val/<source>/bpb", ...} plus "val/loss" (token-weighted
    over all sources) and "val/bpb"."""
    out: Dict[str, float] = {}
    tot_nll, tot_tok, tot_bytes = 0.0, 0, 0
    for name, batches in batches_by_source.items():
        r = validation_nll(model, batches, tokenizer, amp_dtype)
        if not r["tokens"]:
            continue
        out[f"val/{name}/loss"] = r["loss"]
        tot_nll += r["loss"] * r["tokens"]
        tot_tok += r["tokens"]
        if "bpb" in r:
            out[f"val/{name}/bpb"] = r["bpb"]
            tot_bytes += r["bytes"]
    if tot_tok:
        out["val/loss"] = tot_nll / tot_tok
    if tot_bytes:
        out["val/bpb"] = tot_nll / math.log(2) / tot_bytes
    return out
