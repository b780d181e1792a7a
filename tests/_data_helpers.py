"""Small builders shared by the data tests (tiny corpora written to tmp_path)."""
import json

from data import DataConfig, SourceConfig


def write_jsonl(path, texts, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def docs(n, prefix="doc"):
    # distinct, varied lengths so packing splits documents across rows
    return [f"{prefix} {i}: " + "word " * (i % 7 + 1) for i in range(n)]


def config(train_paths, val_paths=None, seq_len=16, **kw):
    return DataConfig(train=[SourceConfig(paths=list(train_paths))],
                      val=[SourceConfig(paths=list(val_paths or train_paths))], tokenizer="byte", seq_len=seq_len,
                      pin_memory=False, **kw)


def take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out
