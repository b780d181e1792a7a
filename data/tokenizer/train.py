"""Train a lossless sentencepiece model from a streamed sample of a corpus.

Lossless means decode(encode(x)) == x: no normalisation, whitespace kept as is (runs of spaces may form
pieces), newlines and tabs are pieces of their own, anything else unseen falls back to bytes.
Usage: python -m data.tokenizer train --input FILES/GLOBS --text-field text --vocab-size N --output X.model
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import List

# The trainer reads "sentences"; documents are split into lines so no sentence exceeds its length limit,
# and the newline itself is taught as a user-defined piece.
_USER_SYMBOLS = ["\n", "\n\n", "\t"]
_MAX_SENTENCE_BYTES = 8192


def sample_lines(paths: List[str], text_field: str, max_lines: int, seed: int) -> List[str]:
    """Reservoir sample of document lines, read streaming (memory bounded by max_lines)."""
    from data.sources import SourceSpec, iter_documents

    rng = random.Random(seed)
    reservoir: List[str] = []
    seen = 0
    spec = SourceSpec.from_paths(paths, text_field=text_field)
    for text in iter_documents(spec):
        for line in text.split("\n"):
            if not line:
                continue
            line = line[: _MAX_SENTENCE_BYTES // 4]
            seen += 1
            if len(reservoir) < max_lines:
                reservoir.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    reservoir[j] = line
    if not reservoir:
        raise ValueError(f"tokenizer training: no text found in {paths} (field {text_field!r})")
    return reservoir


def train(paths: List[str], output: str, vocab_size: int, text_field: str = "text", max_lines: int = 2_000_000,
          seed: int = 0, model_type: str = "bpe", num_threads: int = 2) -> None:
    import sentencepiece as spm

    lines = sample_lines(paths, text_field, max_lines, seed)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(Path(output).with_suffix("")),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=_USER_SYMBOLS,
        character_coverage=0.9995,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    produced = Path(output).with_suffix(".model")
    if produced != Path(output):
        produced.replace(output)
    Path(output).with_suffix(".vocab").unlink(missing_ok=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data.tokenizer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a lossless sentencepiece model")
    t.add_argument("--input", nargs="+", required=True, help="jsonl/text/parquet files, directories or globs")
    t.add_argument("--text-field", default="text")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True)
    t.add_argument("--max-lines", type=int, default=2_000_000, help="reservoir sample size (lines)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--num-threads", type=int, default=2)
    args = ap.parse_args(argv)
    train(args.input, args.output, args.vocab_size, args.text_field, args.max_lines, args.seed, args.model_type,
          args.num_threads)
    print(f"wrote {args.output}")

