"""Find which of many byte patterns occur in a buffer, in one pass over the buffer instead of one per pattern.

`verify` looks for thousands of patterns (texts, text pieces, content hashes and ids of every deleted record) in
hundreds of megabytes (checkpoints, DVC cache and remote, git objects). `bytes.find` per pattern costs patterns x
bytes; here each pattern gets an anchor (8 bytes from its middle, or its first 4 bytes when it is shorter), the
buffer's windows of that width are hashed with numpy and looked up in a bitmap of the anchors' hashes, and only
the few candidate positions are compared in Python. Every occurrence of a pattern has its anchor at a known
offset, so nothing is missed; the bitmap only decides where to look.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_TABLE_BITS = 22
_WINDOW = 1 << 22
"""Positions hashed per numpy step (its temporaries are 8 bytes per position)."""
_MIN_BUFFER = 1 << 11
"""Below this, or with few patterns, `bytes.find` per pattern is faster than hashing."""
_MIN_PATTERNS = 8
_MULT = {8: np.uint64(0x9E3779B97F4A7C15), 4: np.uint64(0x9E3779B1)}


def _key(anchor: bytes) -> int:
    return int.from_bytes(anchor, "little")


def _hash(words: np.ndarray, width: int) -> np.ndarray:
    # multiplicative hashing; uint64 arithmetic wraps, which is the point
    bits = 64 if width == 8 else 32
    mixed = words * _MULT[width]
    if width == 4:
        mixed &= np.uint64(0xFFFFFFFF)
    return (mixed >> np.uint64(bits - _TABLE_BITS)).astype(np.intp)


def _windows(arr: np.ndarray, start: int, stop: int, width: int) -> np.ndarray:
    """The little-endian words of `width` bytes starting at each position in [start, stop)."""
    words = arr[start:stop].astype(np.uint64)
    for j in range(1, width):
        words |= arr[start + j : stop + j].astype(np.uint64) << np.uint64(8 * j)
    return words


class PatternIndex:
    """The patterns to look for, indexed by anchor; `found(buf)` says which occur in `buf`."""

    def __init__(self, patterns: list[bytes]):
        self.patterns = list(dict.fromkeys(p for p in patterns if p))
        self.short = [p for p in self.patterns if len(p) < 4]
        self.anchors: dict[int, dict[int, list[tuple[bytes, int]]]] = {8: {}, 4: {}}
        self.tables: dict[int, np.ndarray] = {}
        for p in self.patterns:
            if len(p) < 4:
                continue
            width = 8 if len(p) >= 8 else 4
            offset = (len(p) - width) // 2 if width == 8 else 0
            key = _key(p[offset : offset + width])
            self.anchors[width].setdefault(key, []).append((p, offset))
        for width, by_key in self.anchors.items():
            if by_key:
                table = np.zeros(1 << _TABLE_BITS, dtype=bool)
                keys = np.fromiter(by_key, dtype=np.uint64, count=len(by_key))
                table[_hash(keys, width)] = True
                self.tables[width] = table

    def found(
        self,
        buf: bytes,
        accept: Callable[[bytes, int], bool] | None = None,
        skip: set[bytes] | None = None,
    ) -> set[bytes]:
        """The patterns that occur in `buf` (not in `skip`) at a position `accept(pattern, pos)` allows
        (every position when None)."""
        skip = skip or set()
        wanted = [p for p in self.patterns if p not in skip]
        if len(buf) < _MIN_BUFFER or len(wanted) < _MIN_PATTERNS:
            return {p for p in wanted if _find(buf, p, 0, accept)}
        hits = {p for p in self.short if p not in skip and _find(buf, p, 0, accept)}
        arr = np.frombuffer(buf, dtype=np.uint8)
        for width, table in self.tables.items():
            anchors = self.anchors[width]
            last = len(arr) - width + 1
            for start in range(0, max(last, 0), _WINDOW):
                stop = min(start + _WINDOW, last)
                words = _windows(arr, start, stop, width)
                for i in np.flatnonzero(table[_hash(words, width)]):
                    for pat, offset in anchors.get(int(words[i]), ()):
                        begin = start + int(i) - offset
                        if pat in hits or pat in skip or begin < 0:
                            continue
                        if buf.startswith(pat, begin) and (accept is None or accept(pat, begin)):
                            hits.add(pat)
        return hits


def _find(buf: bytes, pat: bytes, start: int, accept: Callable[[bytes, int], bool] | None) -> bool:
    pos = buf.find(pat, start)
    while pos != -1:
        if accept is None or accept(pat, pos):
            return True
        pos = buf.find(pat, pos + 1)
    return False
