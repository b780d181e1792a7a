"""lm-evaluation-harness adapter: run standard tasks (NQ, TriviaQA, HellaSwag, PIQA, ...) on a mnemo model.

    python -m eval.lm_eval_adapter --model mnemo --model_args checkpoint=runs/x --device cuda --tasks piqa
    # (lm_eval's own CLI with "mnemo" registered; its flags work, e.g. --include_path DIR, --batch_size 16;
    #  give the device with --device, not in model_args: lm_eval passes both and they would clash)
    # or from Python:
    import lm_eval
    from eval.lm_eval_adapter import MnemoLM          # importing registers the model name "mnemo"
    lm_eval.simple_evaluate(model=MnemoLM(checkpoint="runs/x"), tasks=["piqa"])
    lm_eval.simple_evaluate(model="mnemo", model_args="checkpoint=runs/x,dtype=bf16", tasks=["piqa"])

model_args: checkpoint (a checkpoint or run directory), tokenizer (default: the run's, as `python -m eval`
finds it), device (default cuda when available; a CUDA device on a machine without one falls back to the
CPU, since lm_eval's CLI passes cuda:0 by default), dtype (auto | fp32 | bf16 | fp16 autocast; auto, as in
`python -m eval`: bf16 on GPU, fp32 on CPU),
batch_size ("auto" -> max_batch_size or 16), max_gen_toks (default 256), add_bos (default true). From Python,
model=<Transformer> and tokenizer=<tokenizer> instead of a checkpoint.

`lm_eval` is optional: this module imports without it; `MnemoLM` (registered as "mnemo") exists only when
lm_eval is importable, otherwise it is None. The request logic lives in `MnemoLMCore`, which needs no lm_eval.
- loglikelihood is the built-in scorer (eval.scoring on eval.text's encoding), so lm_eval's numbers and
  `python -m eval` agree. The context starts with BOS, and a context of "" is BOS alone: the first
  continuation token is always scored.
- loglikelihood_rolling follows lm_eval's windows (LM.loglikelihood_rolling): BOS + the first max_length
  tokens, then windows of max_length predictions each conditioned on the token before them; the last window
  is given a full max_length of context. Every token is scored exactly once.
- generate_until: greedy (sampling when do_sample=true) with the KV cache, cut at the first `until` string
  and at EOS; max_gen_toks is capped below the model's context.
It runs in one process (rank 0 of 1): under torchrun every rank would score every request; use
`python -m eval` for multi-GPU evaluation of the built-in tasks.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from model.device import pick_device, pick_dtype

from .device import max_seq_len, model_device
from .generate import generate_text
from .scoring import continuation_logprobs
from .text import encode_request, prefix_id

log = logging.getLogger(__name__)

# generation kwargs that are handled (the rest, e.g. top_k or num_beams, are ignored with a warning)
_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "seed"}


def _args(request) -> tuple:
    """lm_eval passes Instance objects (with .args); plain tuples are accepted too."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _batch_size(batch_size: Any, max_batch_size: Any) -> int:
    # lm_eval may pass "auto" or "auto:N" (auto batch sizing): a fixed size is used then.
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
        return batch_size
    if str(batch_size).isdigit() and int(batch_size) > 0:
        return int(batch_size)
    if str(batch_size).startswith("auto"):
        return int(max_batch_size) if str(max_batch_size).isdigit() and int(max_batch_size) > 0 else 16
    raise ValueError(f"MnemoLM: batch_size must be a positive integer or 'auto', got {batch_size!r}")


def _device(device: Optional[str]) -> str:
    # lm_eval's CLI passes device="cuda:0" unless --device is given; on a machine without CUDA, use the CPU.
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            log.warning("MnemoLM: device %s requested but CUDA is not available: using cpu", device)
        return str(pick_device("auto"))
    return str(device)


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> List[Tuple[List[int], List[int]]]:
    """lm_eval's disjoint rolling windows (get_rolling_token_windows with context_len=1 + make_disjoint_window)
    as (context, continuation) requests: continuation_logprobs keeps the last max_len + 1 tokens of each, so
    every window's forward is at most max_len tokens, and the last (short) window gets a full context."""
    full = [prefix] + list(tokens)
    out = []
    for start in range(0, len(tokens), max_len):
        cont = list(tokens[start:start + max_len])
        out.append((full[max(0, start + len(cont) - max_len):start + 1], cont))
    return out


class MnemoLMCore:
    def __init__(self, model=None, tokenizer=None, checkpoint: Optional[str] = None, tokenizer_path: Optional[str] = None,
                 batch_size: Any = 16, device: Optional[str] = None, max_gen_toks: int = 256, add_bos: bool = True,
                 dtype: Any = "auto", max_batch_size: Any = None, **ignored):
        if ignored:
            log.warning("MnemoLM: ignoring unknown model_args %s", sorted(ignored))
        if isinstance(tokenizer, str):  # model_args "tokenizer=PATH|byte" (a string, not a tokenizer object)
            tokenizer_path, tokenizer = tokenizer, None
        if model is None:
            if checkpoint is None:
                raise ValueError("MnemoLM: give model=<Transformer> and tokenizer=..., or checkpoint=DIR")
            device = _device(device)
            model, tokenizer = _load(str(checkpoint), tokenizer_path, device)
            self.checkpoint: Optional[str] = str(checkpoint)
        else:
            if tokenizer is None and tokenizer_path:
                from data import load_tokenizer

                tokenizer = load_tokenizer(tokenizer_path)
            self.checkpoint = None
        if tokenizer is None:
            raise ValueError("MnemoLM: a tokenizer is required with model=")
        self.model, self.tokenizer = model.eval(), tokenizer
        # model_args dtype -> autocast dtype of the scorer and generation; auto as `python -m eval`
        self.amp_dtype = pick_dtype(dtype, model_device(model), key="MnemoLM: dtype")
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.max_gen_toks, self.add_bos = int(max_gen_toks), bool(add_bos)
        self.max_length = max_seq_len(model) or 2048
        self._device = model_device(model)  # what lm_eval's LM.device reports

    def _hook(self, kind: str, args, result) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = [_args(r)[:2] for r in requests]  # a third element (multimodal inputs) is not used
        out: List[Optional[Tuple[float, bool]]] = [(0.0, True) if cont == "" else None for _, cont in pairs]
        todo = [i for i, o in enumerate(out) if o is None]
        reqs = [encode_request(self.tokenizer, pairs[i][0], pairs[i][1], self.add_bos) for i in todo]
        for i, res in zip(todo, continuation_logprobs(self.model, reqs, self.batch_size, self.amp_dtype)):
            out[i] = res
        for args, res in zip(pairs, out):
            self._hook("loglikelihood", args, res)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        texts = [_args(r)[0] for r in requests]
        first = prefix_id(self.tokenizer)
        reqs, owner = [], []
        for i, text in enumerate(texts):
            windows = rolling_windows(list(self.tokenizer.encode(text)), first, self.max_length)
            reqs.extend(windows)
            owner.extend([i] * len(windows))
        out = [0.0] * len(texts)  # an empty text has log-likelihood 0
        # all windows of all texts in one call: batches stay full
        for i, (score, _) in zip(owner, continuation_logprobs(self.model, reqs, self.batch_size, self.amp_dtype)):
            out[i] += score
        for text, total in zip(texts, out):
            self._hook("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        items = [_args(r)[:2] for r in requests]
        groups: Dict[str, List[int]] = {}
        for i, (_, kwargs) in enumerate(items):
            groups.setdefault(json.dumps(kwargs or {}, sort_keys=True, default=str), []).append(i)
        out: List[Optional[str]] = [None] * len(items)
        for key, idx in groups.items():
            kw = dict(json.loads(key))
            unused = sorted(set(kw) - _GEN_KEYS)
            if unused:
                log.warning("MnemoLM.generate_until: ignoring generation kwargs %s", unused)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.get("max_gen_toks", kw.get("max_new_tokens", self.max_gen_toks)))
            if n_new >= self.max_length:
                log.warning("MnemoLM.generate_until: max_gen_toks %d capped to %d (context %d)",
                            n_new, self.max_length - 1, self.max_length)
                n_new = self.max_length - 1
            do_sample = bool(kw.get("do_sample", False))
            temperature = float(kw.get("temperature") or 0.0) if do_sample else 0.0
            texts = generate_text(
                self.model, self.tokenizer, [items[i][0] for i in idx], n_new, stop=until,
                temperature=temperature, top_p=float(kw.get("top_p") or 1.0), seed=int(kw.get("seed") or 0),
                batch_size=self.batch_size, add_bos=self.add_bos, amp_dtype=self.amp_dtype,
            )
            for i, t in zip(idx, texts):
                out[i] = t
                self._hook("generate_until", items[i], t)
        return out  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        """Recorded by lm_eval.simple_evaluate in results["config"]."""
        n = sum(p.numel() for p in self.model.parameters())
        return {"model_name": "mnemo", "checkpoint": self.checkpoint, "model_num_parameters": n,
                "max_length": self.max_length, "add_bos": self.add_bos}


def _load(checkpoint: str, tokenizer_path: Optional[str], device: str):
    from data import load_tokenizer
    from model.checkpoint import load_model, resolve_checkpoint

    from .run_files import resolve_tokenizer, run_dir_of

    model, _ = load_model(checkpoint, device)
    if tokenizer_path:
        return model, load_tokenizer(tokenizer_path)
    return model, resolve_tokenizer(None, run_dir_of(resolve_checkpoint(checkpoint)))


def _register(cls) -> None:
    """register_model("mnemo"), tolerating a reload of this module (tests, importlib.reload): lm_eval refuses a
    second class under a name, so a stale MnemoLM from an earlier import of this module is replaced."""
    registry = _registry
    try:
        registry.register_model("mnemo")(cls)
        return
    except (ValueError, AssertionError):
        table = getattr(registry, "MODEL_REGISTRY", None)  # a Registry (lm_eval >= 0.4.9) or a dict (older)
        store = getattr(table, "_objs", table)
        old = store.get("mnemo") if isinstance(store, dict) else None
        if not (isinstance(old, type) and old.__module__ == cls.__module__ and old.__qualname__ == cls.__qualname__):
            raise  # another model took the name
        store["mnemo"] = cls


try:
    from lm_eval.api import registry as _registry
    from lm_eval.api.model import LM as _LM
except ImportError:  # optional dependency missing: the adapter is simply unavailable
    _LM = _registry = None

if _LM is not None:
    class MnemoLM(MnemoLMCore, _LM):
        """lm_eval model "mnemo" (see the module docstring for its model_args)."""

        def __init__(self, *args, **kwargs):
            _LM.__init__(self)
            MnemoLMCore.__init__(self, *args, **kwargs)

    if __name__ != "__main__":  # `python -m eval.lm_eval_adapter` registers the importable copy (see the end)
        _register(MnemoLM)
else:
    MnemoLM = None  # type: ignore[assignment,misc]


def main(argv: Optional[List[str]] = None) -> None:
    """lm_eval's command line with "mnemo" registered (its CLI cannot import a model class by itself)."""
    if MnemoLM is None:
        raise SystemExit("error: lm_eval is not installed (pip install lm_eval)")
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    from eval.lm_eval_adapter import main as _main  # the module proper, which registers "mnemo"

    _main()
