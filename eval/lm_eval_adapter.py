"""lm-evaluation-harness adapter: run standard tasks (NQ, TriviaQA, HellaSwag, PIQA, ...) on a mnemo model.

    lm_eval --model mnemo --model_args checkpoint=runs/x --tasks piqa --include_path ...   # after `import eval.lm_eval_adapter`
    # or from Python:
    from eval.lm_eval_adapter import MnemoLM
    lm_eval.simple_evaluate(model=MnemoLM(model=m, tokenizer=tok), tasks=["piqa"])

`lm_eval` is optional: this module imports without it; `MnemoLM` (registered as "mnemo") exists only when
lm_eval is importable, otherwise it is None. The request logic lives in `MnemoLMCore`, which needs no lm_eval.
Its loglikelihood is the built-in scorer (eval.scoring on eval.text's encoding), so lm_eval's numbers and
`python -m eval` agree; a context of "" is scored after BOS, so the first continuation token counts.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from .device import max_seq_len
from .generate import generate_text
from .scoring import continuation_logprobs, rolling_requests
from .text import encode_request, prefix_id


def _args(request) -> tuple:
    """lm_eval passes Instance objects (with .args); plain tuples are accepted too."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class MnemoLMCore:
    def __init__(self, model=None, tokenizer=None, checkpoint: Optional[str] = None, tokenizer_path: Optional[str] = None,
                 batch_size: Any = 16, device: Optional[str] = None, max_gen_toks: int = 256, add_bos: bool = True,
                 **_ignored):
        if model is None:
            if checkpoint is None:
                raise ValueError("MnemoLM: give model=<Transformer> and tokenizer=..., or checkpoint=DIR")
            model, tokenizer = _load(checkpoint, tokenizer_path, device or "cpu")
        if tokenizer is None:
            raise ValueError("MnemoLM: a tokenizer is required with model=")
        self.model, self.tokenizer = model.eval(), tokenizer
        # lm_eval may pass "auto" or "auto:N" (auto batch sizing); a fixed size is used then.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks, self.add_bos = max_gen_toks, add_bos
        self.max_length = max_seq_len(model) or 2048

    def _hook(self, kind: str, args, result) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = [_args(r) for r in requests]
        reqs = [encode_request(self.tokenizer, ctx, cont, self.add_bos) for ctx, cont in pairs]
        out = continuation_logprobs(self.model, reqs, self.batch_size)
        for args, res in zip(pairs, out):
            self._hook("loglikelihood", args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        out = []
        first = prefix_id(self.tokenizer)
        for r in requests:
            (text,) = _args(r)[:1]
            tokens = list(self.tokenizer.encode(text))
            if not tokens:
                out.append(0.0)
                continue
            scores = continuation_logprobs(self.model, rolling_requests(tokens, first, self.max_length), self.batch_size)
            total = sum(s for s, _ in scores)
            self._hook("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        items = [_args(r) for r in requests]
        groups: Dict[str, List[int]] = {}
        for i, (_, kwargs) in enumerate(items):
            groups.setdefault(json.dumps(kwargs or {}, sort_keys=True, default=str), []).append(i)
        out: List[Optional[str]] = [None] * len(items)
        for key, idx in groups.items():
            kw = dict(json.loads(key))
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            texts = generate_text(
                self.model, self.tokenizer, [items[i][0] for i in idx], int(kw.pop("max_gen_toks", self.max_gen_toks)),
                stop=until, temperature=temperature, top_p=float(kw.pop("top_p", 1.0) or 1.0),
                seed=int(kw.pop("seed", 0) or 0), batch_size=self.batch_size, add_bos=self.add_bos,
            )
            for i, t in zip(idx, texts):
                out[i] = t
                self._hook("generate_until", items[i], t)
        return out  # type: ignore[return-value]


def _load(checkpoint: str, tokenizer_path: Optional[str], device: str):
    from data import load_tokenizer
    from model.checkpoint import load_model, resolve_checkpoint

    from .__main__ import EvalCLIConfig, resolve_tokenizer, run_dir_of

    model, _ = load_model(checkpoint, device)
    if tokenizer_path:
        return model, load_tokenizer(tokenizer_path)
    cfg = EvalCLIConfig(checkpoint=checkpoint)
    return model, resolve_tokenizer(cfg, run_dir_of(resolve_checkpoint(checkpoint)))


def _make_lm_class():
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:  # optional dependency missing: the adapter is simply unavailable
        return None

    @register_model("mnemo")
    class MnemoLM(MnemoLMCore, LM):
        def __init__(self, *args, **kwargs):
            LM.__init__(self)
            MnemoLMCore.__init__(self, *args, **kwargs)

    return MnemoLM


MnemoLM = _make_lm_class()
