"""The one-pass multi-pattern search finds exactly what `bytes.find` per pattern finds."""

from __future__ import annotations

import random

from sisaflow.scan import patterns as multisearch
from sisaflow.scan.patterns import PatternIndex


def _naive(buf: bytes, patterns: list[bytes], accept=None) -> set[bytes]:
    out = set()
    for p in patterns:
        pos = buf.find(p)
        while pos != -1:
            if accept is None or accept(p, pos):
                out.add(p)
                break
            pos = buf.find(p, pos + 1)
    return out


def _patterns(rng: random.Random) -> list[bytes]:
    lengths = [2, 3, 4, 5, 7, 8, 9, 16, 40, 64, 200]
    pats = [rng.randbytes(rng.choice(lengths)) for _ in range(300)]
    # several patterns sharing one anchor (same middle), and one inside another
    pats += [b"A" * 10 + b"middle!!" + b"B" * 10, b"C" * 10 + b"middle!!" + b"D" * 10, b"middle!!"]
    return pats


def test_planted_patterns_found_anywhere_including_chunk_edges():
    rng = random.Random(7)
    pats = _patterns(rng)
    size = multisearch._WINDOW * 2 + 1000  # crosses two hashing windows
    buf = bytearray(rng.randbytes(size))
    planted = rng.sample(pats[:300], 40) + [pats[300]]
    spots = [0, size - len(planted[1]), multisearch._WINDOW - 3, 2 * multisearch._WINDOW - 5]
    spots += [rng.randrange(0, size - 300) for _ in planted[4:]]
    for p, at in zip(planted, spots):
        buf[at : at + len(p)] = p
    buf = bytes(buf)
    expected = _naive(buf, pats)
    assert set(planted) <= expected | {p for p in planted if p not in buf}
    assert PatternIndex(pats).found(buf) == expected
    assert pats[300] in expected and b"middle!!" in expected and pats[301] not in expected


def test_small_buffers_skip_and_accept():
    rng = random.Random(3)
    pats = _patterns(rng)
    idx = PatternIndex(pats)
    for size in (0, 10, 3000, 70000):
        buf = bytearray(rng.randbytes(size))
        for p in rng.sample(pats, 5):
            if len(p) < size:
                at = rng.randrange(0, size - len(p) + 1)
                buf[at : at + len(p)] = p
        buf = bytes(buf)
        assert idx.found(buf) == _naive(buf, pats), size
        skip = set(pats[:150])
        assert idx.found(buf, skip=skip) == _naive(buf, pats) - skip

    # accept: an id counts only as a whole token, so the first (embedded) copy is refused, the second taken
    ids = [f"id-{i:05d}".encode() for i in range(20)]
    text = b"x" * 5000 + b"aid-00003b " + b"y" * 5000 + b" id-00007 " + b"z" * 100

    def whole(p: bytes, pos: int) -> bool:
        return text[pos - 1 : pos] == b" " and text[pos + len(p) : pos + len(p) + 1] == b" "

    assert PatternIndex(ids).found(text, whole) == {b"id-00007"}
    assert PatternIndex(ids).found(text) == {b"id-00003", b"id-00007"}
