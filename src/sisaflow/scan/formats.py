"""Searching one blob, file or stream for a scan's needles: raw bytes, Parquet string and binary columns (record
ids as exact values), and decoded forms (gzip/lzma/bz2/zlib streams, zip members, base64 payloads inside JSON
such as Prefect's persisted results). Large files and git objects are read in overlapping chunks.

Decoding is bounded: no stream or member is inflated past DECODED_MAX_BYTES (a small zip or gzip bomb would
otherwise take the scan's memory), and what is cut there, what is compressed in a format this module cannot
read (zstd), and a compressed file too large to decode are each named in a note, never passed over in silence.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import contextlib
import hashlib
import io
import json
import lzma
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sisaflow.scan.targets import Needles, ScanReport

IN_MEMORY_BYTES = 64 << 20
"""Files (and git objects) up to this size are also decoded (compressed streams, base64 in JSON)."""
DECODED_MAX_BYTES = 4 * IN_MEMORY_BYTES
"""No decoded stream or zip member grows past this; a longer one is searched up to it, with a note."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 8 << 20
_B64 = re.compile(rb"[A-Za-z0-9+/=\s]+")


def _parquet_hits(source, nd: Needles) -> set[tuple[int, str]]:
    """Search the string and binary columns of a Parquet file (path or buffer)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(source)
    schema = pf.schema_arrow
    cols = [
        f.name
        for f in schema
        if pa.types.is_string(f.type)
        or pa.types.is_large_string(f.type)
        or pa.types.is_binary(f.type)
        or pa.types.is_large_binary(f.type)
        or pa.types.is_dictionary(f.type)
        or str(f.type) in ("string_view", "binary_view")
    ]
    hits: set[tuple[int, str]] = set()
    if not cols:
        return hits
    ids = pa.array(list(nd.exact_ids), type=pa.string()) if nd.exact_ids else None
    for batch in pf.iter_batches(columns=cols, batch_size=65536):
        for arr in batch.columns:
            if pa.types.is_dictionary(arr.type):
                arr = arr.dictionary
            if str(arr.type) in ("string_view", "binary_view"):
                arr = arr.cast(pa.large_string() if str(arr.type) == "string_view" else pa.large_binary())
            if not (
                pa.types.is_string(arr.type)
                or pa.types.is_large_string(arr.type)
                or pa.types.is_binary(arr.type)
                or pa.types.is_large_binary(arr.type)
            ):
                continue
            if ids is not None and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
                present = pc.unique(arr.filter(pc.is_in(arr, value_set=ids.cast(arr.type)))).to_pylist()
                for rid in present:
                    hits.update((i, "record_id") for i in nd.exact_ids.get(rid, []))
            # the values one after another, separated so that whole-token id matches keep their bounds
            joined = b"\x00".join(v for v in arr.cast(pa.large_binary()).to_pylist() if v is not None)
            hits |= nd.search(joined)
    return hits


def compression(head: bytes) -> str | None:
    """The compressed format whose magic bytes `head` starts with, if any."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:6] == b"\xfd7zXZ\x00" or head[:3] == b"\x5d\x00\x00":
        return "xz"
    if head[:3] == b"BZh":
        return "bzip2"
    if len(head) >= 2 and head[0] == 0x78 and head[1] in (0x01, 0x5E, 0x9C, 0xDA):
        return "zlib"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:4] == ZSTD_MAGIC:
        return "zstd"
    return None


def _inflate(kind: str, data: bytes, limit: int) -> tuple[bytes, bool]:
    """`data` decompressed, at most `limit` bytes, and whether the limit cut it. Concatenated gzip members are
    all inflated, as gzip.decompress does."""
    if kind == "xz":
        dx = lzma.LZMADecompressor()
        out = dx.decompress(data, max_length=limit)
        return out, not dx.eof and not dx.needs_input
    if kind == "bzip2":
        db = bz2.BZ2Decompressor()
        out = db.decompress(data, max_length=limit)
        return out, not db.eof and not db.needs_input
    parts: list[bytes] = []
    rest, size = data, 0
    while rest:
        if size >= limit:  # (max_length 0 would mean no limit)
            return b"".join(parts), True
        dz = zlib.decompressobj(31 if kind == "gzip" else 15)
        part = dz.decompress(rest, limit - size)
        parts.append(part)
        size += len(part)
        if dz.unconsumed_tail:
            return b"".join(parts), True
        rest = dz.unused_data if kind == "gzip" and dz.eof else b""
    return b"".join(parts), False


def _zip_members(data: bytes, limit: int, notes: list[str] | None, label: str) -> Iterator[bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            with zf.open(info) as member:
                body = member.read(limit + 1)
            if len(body) > limit and notes is not None:
                notes.append(
                    f"{label}: zip member {info.filename!r} searched in its first {limit} bytes only"
                )
            yield body[:limit]


def _decoded(data: bytes, depth: int = 0, notes: list[str] | None = None, label: str = "") -> Iterator[bytes]:
    """Decoded forms of `data`: compressed streams, zip members and base64 payloads inside JSON (two levels
    deep), each at most DECODED_MAX_BYTES; a cut, an unreadable format or a damaged stream is noted."""
    if depth > 1 or len(data) < 4:
        return
    out: list[bytes] = []
    kind = compression(data[:6])
    if kind == "zstd":
        if notes is not None:
            notes.append(f"{label}: a zstd stream, not decoded (searched raw only)")
    elif kind == "zip":
        try:
            out.extend(_zip_members(data, DECODED_MAX_BYTES, notes, label))
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
            if notes is not None:
                notes.append(f"{label}: zip not readable ({exc}); searched raw only")
    elif kind is not None:
        try:
            body, cut = _inflate(kind, data, DECODED_MAX_BYTES)
            out.append(body)
            if cut and notes is not None:
                notes.append(
                    f"{label}: {kind} stream searched in its first {DECODED_MAX_BYTES} decoded bytes only"
                )
        except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):
            pass  # bytes that only look like a stream's start: searched raw, as they are
    stripped = data.lstrip()
    if stripped[:1] in (b"{", b"[") and len(data) <= IN_MEMORY_BYTES:
        with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
            out.extend(_b64_values(json.loads(data)))
    for d in out:
        yield d
        yield from _decoded(d, depth + 1, notes, label)


def _b64_values(obj) -> Iterator[bytes]:
    """Base64 payloads among a JSON document's string values (Prefect's persisted results are such)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, str) and len(x) >= 24:
            raw = x.encode("ascii", "ignore")
            if len(raw) == len(x) and _B64.fullmatch(raw):
                with contextlib.suppress(binascii.Error, ValueError):
                    yield base64.b64decode(raw)


def _is_parquet(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] == b"PAR1" and data[-4:] == b"PAR1"


def search_bytes(
    data: bytes, nd: Needles, notes: list[str] | None = None, label: str = ""
) -> set[tuple[int, str]]:
    """Every (target, what) found in `data`: raw, as Parquet, and decoded."""
    import pyarrow as pa

    hits = nd.search(data)
    if _is_parquet(data):
        try:
            hits |= _parquet_hits(pa.BufferReader(data), nd)
        except Exception as exc:  # a damaged file is still searched raw
            if notes is not None:
                notes.append(f"{label}: not readable as Parquet ({exc}); searched raw only")
    for decoded in _decoded(data, notes=notes, label=label):
        hits |= nd.search(decoded)
        if _is_parquet(decoded):
            with contextlib.suppress(Exception):
                hits |= _parquet_hits(pa.BufferReader(decoded), nd)
    return hits


def search_stream(fh: BinaryIO | io.RawIOBase | io.BufferedIOBase, nd: Needles) -> set[tuple[int, str]]:
    """Raw search of a stream in chunks that overlap by the longest pattern."""
    hits: set[tuple[int, str]] = set()
    done: set[bytes] = set()
    overlap = nd.overlap
    tail = b""
    while True:
        block = fh.read(CHUNK)
        if not block:
            break
        buf = tail + block
        new = nd.search(buf, skip=done)
        hits |= new
        done.update(p for p, owners in nd.patterns.items() if all(o in hits for o in owners))
        tail = buf[-overlap:]
    return hits


def search_file(
    path: Path, nd: Needles, report: ScanReport, label: str, seen: dict[bytes, set] | None = None
) -> set[tuple[int, str]]:
    """Every (target, what) found in the file at `path`. With `seen`, a content already searched (the DVC
    cache and remote hold the same bytes as the workspace's outputs) is not searched again: its hits are
    reused, so every place that holds a copy is still named."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        return search_handle(fh, size, nd, report, label, seen)


def search_handle(
    fh: BinaryIO,
    size: int,
    nd: Needles,
    report: ScanReport,
    label: str,
    seen: dict[bytes, set] | None = None,
) -> set[tuple[int, str]]:
    """`search_file` for an open, seekable binary file of `size` bytes: a local file, or an object of a DVC
    remote in an object store."""
    report.files_scanned += 1
    report.bytes_scanned += size
    if size <= IN_MEMORY_BYTES:
        data = fh.read()
        if seen is None:
            return search_bytes(data, nd, report.notes, label)
        key = hashlib.blake2b(data, digest_size=20).digest()
        if key not in seen:
            seen[key] = search_bytes(data, nd, report.notes, label)
        return set(seen[key])
    head = fh.read(6)
    fh.seek(-4, os.SEEK_END)
    parquet = head[:4] == b"PAR1" and fh.read(4) == b"PAR1"
    fh.seek(0)
    kind = compression(head)
    if kind is not None:
        report.notes.append(
            f"{label}: {size} bytes of {kind}, over the {IN_MEMORY_BYTES}-byte limit for decoding: searched raw only"
        )
    hits = search_stream(fh, nd)
    if parquet:
        fh.seek(0)
        try:
            hits |= _parquet_hits(fh, nd)
        except Exception as exc:
            report.notes.append(f"{label}: not readable as Parquet ({exc}); searched raw only")
    return hits


class Limited(io.RawIOBase):
    """The next `n` bytes of a stream, as a stream."""

    def __init__(self, fh, n: int) -> None:
        self.fh, self.left = fh, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.fh.read(size) if size else b""
        self.left -= len(data)
        return data


def drain(fh, n: int) -> None:
    while n > 0:
        chunk = fh.read(min(n, CHUNK))
        if not chunk:
            break
        n -= len(chunk)
