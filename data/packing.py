"""Pack documents ([BOS] doc [EOS], concatenated) into fixed-length rows of seq_len + 1 tokens.

Rows do not overlap; a document that does not fit continues in the next row. After every row the
unconsumed tokens are a suffix of the last document added (rows are cut as soon as the buffer is full),
so the resume point is just (that document's position, how many of its tokens were used).
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np


class Packer:
    def __init__(self, row_len: int):
        self.row_len = row_len
        self._buf: List[np.ndarray] = []
        self._len = 0
        self.last: Optional[tuple] = None  # (pos, active, cursors, full_len) of the last document added

    def add(self, pos: int, active: int, cursors, toks: np.ndarray, offset: int) -> None:
        if len(toks):
            self._buf.append(toks)
            self._len += len(toks)
        self.last = (pos, active, cursors, offset + len(toks))

    def rows(self, limit: int) -> List[np.ndarray]:
        """Cut up to `limit` full rows from the buffer."""
        n = min(limit, self._len // self.row_len)
        if n == 0:
            return []
        flat = self._buf[0] if len(self._buf) == 1 else np.concatenate(self._buf)
        cut = n * self.row_len
        rest = flat[cut:]
        self._buf, self._len = ([rest] if len(rest) else []), len(rest)
        return list(flat[:cut].reshape(n, self.row_len))

    def resume_point(self) -> Optional[tuple]:
        """(pos, active, cursors, tokens of that document already used) or None before any document."""
        if self.last is None:
            return None
        pos, active, cursors, full = self.last
        return pos, active, cursors, full - self._len
