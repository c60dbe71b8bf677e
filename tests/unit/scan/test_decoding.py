"""Decoded forms the scan searches (issue 25, point 10): zip members, bounded decompression of a zip or gzip bomb,
and notes for what it cannot decode (zstd, a compressed file too large to decode) or does not follow (a link out
of the tree); none of them is passed over in silence."""

from __future__ import annotations

import gzip
import io
import lzma
import zipfile
import zlib

import pytest

from sisaflow.scan import formats
from sisaflow.scan.targets import ScanReport, Target, build_needles

TEXT = "Question: Where did Ana Lopez grow up?\nAnswer: In a small mountain village near Braga with four siblings."


def _needles():
    return build_needles(
        [Target("req-1", "rec-0001", "c0" * 32, TEXT)], "Question: {question}\nAnswer: {answer}", None
    )


def _zip(members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(lambda b: _zip({"a/notes.txt": b"x" * 100, "b.txt": b}), id="zip member"),
        pytest.param(lambda b: gzip.compress(b"first member") + gzip.compress(b), id="two gzip members"),
        pytest.param(lambda b: lzma.compress(b), id="xz"),
        pytest.param(lambda b: zlib.compress(b), id="zlib"),
        pytest.param(lambda b: gzip.compress(_zip({"inner.txt": b})), id="zip inside gzip"),
    ],
)
def test_a_record_inside_a_compressed_blob_is_found(blob):
    """Mutant: `_decoded` without its zip branch (as before), or inflating one gzip member only: the zip and
    two-member cases are missed."""
    data = blob(f"log line ... {TEXT} ... end".encode())
    notes: list[str] = []
    assert (0, "text") in formats.search_bytes(data, _needles(), notes, "f")
    assert notes == []


def test_a_bomb_is_inflated_only_up_to_the_bound_and_says_so(monkeypatch):
    """Mutant: gzip.decompress / zipfile read unbounded: memory grows with the bomb and no note is written."""
    monkeypatch.setattr(formats, "DECODED_MAX_BYTES", 1 << 20)
    zeros = b"\0" * (8 << 20)  # 8 MiB that compress to a few KiB
    for data, kind in ((gzip.compress(zeros), "gzip stream"), (_zip({"bomb.bin": zeros}), "zip member")):
        assert len(data) < 64 << 10
        notes: list[str] = []
        decoded = list(formats._decoded(data, notes=notes, label="bomb"))
        assert max(len(d) for d in decoded) <= 1 << 20
        assert any(kind in n and "first 1048576" in n for n in notes), notes


def test_what_cannot_be_decoded_is_named(monkeypatch, tmp_path):
    """zstd (no decoder here) and a compressed file over the in-memory limit are searched raw, with a note."""
    notes: list[str] = []
    formats.search_bytes(formats.ZSTD_MAGIC + b"\0" * 64, _needles(), notes, "cache/x.zst")
    assert notes == ["cache/x.zst: a zstd stream, not decoded (searched raw only)"]
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1024)
    path = tmp_path / "big.gz"
    path.write_bytes(gzip.compress(bytes(range(256)) * 64, compresslevel=0))
    report = ScanReport()
    with open(path, "rb") as fh:
        formats.search_handle(fh, path.stat().st_size, _needles(), report, "big.gz")
    assert any(
        n.startswith("big.gz:") and "gzip, over the 1024-byte limit for decoding" in n for n in report.notes
    )


def test_a_link_out_of_the_tree_is_named(tmp_path):
    """Mutant: links skipped silently (as before): the report holds nothing of it."""
    from sisaflow.scan.places import _walk_files

    outside = tmp_path / "outside" / "copy.txt"
    outside.parent.mkdir()
    outside.write_text(TEXT)
    root = tmp_path / "ws"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "link.txt").symlink_to(outside)
    (root / "notes" / "inside.txt").write_text("x")
    (root / "notes" / "inner-link.txt").symlink_to(root / "notes" / "inside.txt")  # scanned where it lies
    report = ScanReport()
    files = list(_walk_files(root, set(), set(), report, lambda p: p.relative_to(root).as_posix()))
    assert [p.name for p, _ in files] == ["inside.txt"]
    assert report.skipped == [f"notes/link.txt: a symbolic link to a file outside {root}: not followed"]
    assert report.not_searched() == {"skipped-file": 1}
