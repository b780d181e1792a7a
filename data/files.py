"""Expand source paths (files, directories, globs) into a sorted file list and detect each file's format."""
from __future__ import annotations

import glob
import os
from typing import List, Optional

_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text",
            ".text": "text", ".md": "text"}
COMPRESSIONS = (".gz", ".zst")


def detect_format(path: str) -> Optional[str]:
    """jsonl / parquet / text from the extension (after stripping .gz/.zst), memmap for an index dir, else None."""
    if os.path.isdir(path):
        return "memmap" if os.path.isfile(os.path.join(path, "index.json")) else None
    name = path.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _FORMATS.get(os.path.splitext(name)[1])


def _dir_files(directory: str) -> List[str]:
    if detect_format(directory) == "memmap":
        return [directory]
    out = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            full = os.path.join(root, n)
            if not n.startswith(".") and detect_format(full):
                out.append(full)
    return out


def expand_paths(patterns: List[str], what: str) -> List[str]:
    """Every pattern must match something; the error names the config key (`what`) and the pattern."""
    files: List[str] = []
    for pat in patterns:
        if glob.has_magic(pat):
            matched = []
            for m in sorted(glob.glob(pat, recursive=True)):
                matched.extend(_dir_files(m) if os.path.isdir(m) else [m])
        elif os.path.isdir(pat):
            matched = _dir_files(pat)
        elif os.path.exists(pat):
            matched = [pat]
        else:
            raise FileNotFoundError(f"{what}: path {pat!r} does not exist")
        if not matched:
            raise FileNotFoundError(f"{what}: {pat!r} matched no data files")
        files.extend(sorted(matched))
    seen, unique = set(), []
    for f in files:  # a file named by two patterns is still read once
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique
