"""Search every place a deleted record could still be copied: text, content hash or record id.

`scan` looks in every file of the workspace (raw bytes, and decoded: Parquet string columns, gzip/lzma/bz2/zlib
streams, base64 payloads inside JSON such as Prefect's persisted results), in every object of the workspace's
git repository (all commits, reachable or not), in the DVC cache, in the DVC remote when it is a local
directory, in the Prefect home and in Ray's temporary directory for the workspace. It finds:

- 'text': the record's text (UTF-8, and as it reads inside JSON), or a distinctive piece of it (a template field
  or line of at least MIN_DISTINCT characters that no kept record of the source contains), so that a copy in
  another layout (the source's own fields, a JSON dump) is found too;
- 'content_hash': the record's content hash (64 hex digits);
- 'record_id': the record's id, as a whole token (in Parquet string columns: an exact value).

Exclusions. The deletion ledger (deletions/) and deletion certificates (reports/certificates/) legitimately hold
ids and content hashes, so there (in the working tree and in git history, and in ledger-shaped git objects no
commit references) only text is reported. The corpus source named in params (the user's own input, which
sisaflow never writes), and the evaluation inputs named in params (evaluate.holdout, evaluate.tofu_perturbed),
are not searched at all, in the working tree or in git history. The report lists both.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import contextlib
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import stat
import string
import subprocess
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sisaflow.config import Params
from sisaflow.errors import SisaflowError
from sisaflow.multisearch import PatternIndex
from sisaflow.paths import Workspace

log = logging.getLogger("sisaflow.verify")

MIN_DISTINCT = 40
"""Shortest piece of a text (template field or line) searched on its own."""
MAX_DISTINCT_PIECES = 3
MIN_RAW_ID = 4
"""Shorter record ids are matched only as exact Parquet values (as raw bytes they would match anywhere)."""
MAX_FILE_BYTES = 2 << 30
"""Larger files are skipped, with a note."""
IN_MEMORY_BYTES = 64 << 20
"""Files (and git objects) up to this size are also decoded (compressed streams, base64 in JSON)."""
CHUNK = 8 << 20

HASH_ONLY_DIRS = ("deletions", "reports/certificates")
"""Places that legitimately hold ids and content hashes (the ledger, certificates): only text is reported there."""
_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_B64 = re.compile(rb"[A-Za-z0-9+/=\s]+")


@dataclass(frozen=True)
class Target:
    """A deleted record to look for. `text` is None when only the hash (and maybe the id) is known."""

    request_id: str
    record_id: str
    content_hash: str
    text: str | None = None


@dataclass(frozen=True)
class Finding:
    """A copy of a target: where ('<relative path>', 'git:<commit>:<path>', 'dvc-cache:<path>',
    'dvc-remote:<path>', 'prefect-home:<path>', 'ray-tmp:<path>') and what ('text' | 'content_hash' |
    'record_id')."""

    request_id: str
    where: str
    what: str
    record_id: str = ""

    @property
    def location_kind(self) -> str:
        """'git', 'dvc-cache', 'dvc-remote', 'prefect-home', 'ray-tmp', or a workspace path's first part."""
        if self.where.startswith(("git:", "dvc-cache:", "dvc-remote:", "prefect-home:", "ray-tmp:")):
            return self.where.split(":", 1)[0]
        return self.where.split("/", 1)[0]

    def to_dict(self) -> dict:
        return {**asdict(self), "location_kind": self.location_kind}


@dataclass
class ScanReport:
    findings: list[Finding] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_scanned: int = 0
    bytes_scanned: int = 0
    git_objects_scanned: int = 0

    @property
    def clean(self) -> bool:
        return not self.findings

    def findings_by_location(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.location_kind] = out.get(f.location_kind, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["findings"] = [f.to_dict() for f in self.findings]
        out["findings_by_location"] = self.findings_by_location()
        out["clean"] = self.clean
        return out


# ---- targets ----


def targets_from_source(
    ws: Workspace,
    params: Params,
    content_hashes: Mapping[str, str] | Iterable[str],
    request_id: str = "",
) -> list[Target]:
    """Targets for `content_hashes`: with id and text for those whose record is in the corpus source, hash-only
    for the rest. `content_hashes` is a set of hashes (all under `request_id`) or a {hash: request_id} map."""
    from sisaflow.corpus import read_records

    wanted = (
        dict(content_hashes)
        if isinstance(content_hashes, Mapping)
        else dict.fromkeys(content_hashes, request_id)
    )
    out: list[Target] = []
    for r in read_records(ws.source(params.corpus.path), params.corpus):
        if r.content_hash in wanted:
            out.append(Target(wanted.pop(r.content_hash), r.record_id, r.content_hash, r.text))
    out.extend(Target(req, "", h, None) for h, req in sorted(wanted.items()))
    return out


def targets_from_ledger(
    ws: Workspace, params: Params, request_ids: Iterable[str] | None = None
) -> list[Target]:
    """Targets for every content hash the deletion ledger records (or only those of `request_ids`)."""
    from sisaflow import ledger

    keep = set(request_ids) if request_ids is not None else None
    hashes: dict[str, str] = {}
    for req in ledger.read_ledger(ws.ledger_file):
        if keep is None or req.request_id in keep:
            for h in req.content_hashes:
                hashes.setdefault(h, req.request_id)
    return targets_from_source(ws, params, hashes) if hashes else []


# ---- needles ----


def _template_values(text: str, template: str | None) -> list[str]:
    """The field values of `text` if it was built from `template`, else []."""
    if not template:
        return []
    pattern, fields = "", 0
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return []
    for literal, name, _, _ in parsed:
        pattern += re.escape(literal)
        if name is not None:
            pattern += "(.*?)"
            fields += 1
    if not fields:
        return []
    m = re.fullmatch(pattern, text, flags=re.DOTALL)
    return list(m.groups()) if m else []


def text_pieces(text: str, template: str | None = None) -> list[str]:
    """The whole text and its distinctive pieces (the longest template fields or lines of >= MIN_DISTINCT)."""
    parts = _template_values(text, template) or text.splitlines()
    pieces = sorted({p.strip() for p in parts if len(p.strip()) >= MIN_DISTINCT}, key=lambda p: (-len(p), p))
    return [text, *[p for p in pieces[:MAX_DISTINCT_PIECES] if p != text]]


def _encodings(s: str) -> list[bytes]:
    """`s` as UTF-8 and as it reads inside JSON (ASCII-escaped or not)."""
    out = [s.encode("utf-8")]
    for ascii_only in (True, False):
        out.append(json.dumps(s, ensure_ascii=ascii_only)[1:-1].encode("utf-8"))
    return list(dict.fromkeys(out))


@dataclass
class _Needles:
    """Byte patterns to search, each naming the (target index, what) pairs it proves."""

    patterns: dict[bytes, list[tuple[int, str]]] = field(default_factory=dict)
    bounded: set[bytes] = field(default_factory=set)
    exact_ids: dict[str, list[int]] = field(default_factory=dict)
    _index: PatternIndex | None = field(default=None, repr=False)

    def add(self, pattern: bytes, target: int, what: str, bounded: bool = False) -> None:
        if not pattern:
            return
        self.patterns.setdefault(pattern, []).append((target, what))
        if bounded:
            self.bounded.add(pattern)

    @property
    def overlap(self) -> int:
        return max((len(p) for p in self.patterns), default=0) + 1

    def search(self, buf: bytes, skip: set[bytes] | None = None) -> set[tuple[int, str]]:
        if self._index is None or len(self._index.patterns) != len(self.patterns):
            self._index = PatternIndex(list(self.patterns))

        def accept(pat: bytes, pos: int) -> bool:
            return pat not in self.bounded or _bounded(buf, pos, len(pat))

        hits: set[tuple[int, str]] = set()
        for pat in self._index.found(buf, accept, skip):
            hits.update(self.patterns[pat])
        return hits


def _bounded(buf: bytes, pos: int, n: int) -> bool:
    before = buf[pos - 1] if pos > 0 else None
    after = buf[pos + n] if pos + n < len(buf) else None
    return before not in _ID_CHARS and after not in _ID_CHARS


def _kept_texts(ws: Workspace, params: Params, target_hashes: set[str], report: ScanReport) -> str | None:
    """The texts of every source record that is not a target, joined (to drop pieces they share)."""
    from sisaflow.corpus import read_records

    try:
        records = read_records(ws.source(params.corpus.path), params.corpus)
    except SisaflowError as exc:
        report.notes.append(
            f"corpus source not readable ({exc}): text pieces are not checked for distinctness"
        )
        return None
    return "\x00".join(r.text for r in records if r.content_hash not in target_hashes)


def build_needles(
    targets: list[Target], template: str | None, kept: str | None, report: ScanReport | None = None
) -> _Needles:
    """The byte patterns for `targets`; text pieces that a kept record also contains are left out."""
    nd = _Needles()
    shared = 0
    for i, t in enumerate(targets):
        if t.text:
            pieces = [p for p in text_pieces(t.text, template) if kept is None or p not in kept]
            shared += not pieces
            if len(pieces) > 1 and pieces[0] == t.text:
                # every piece lies inside the whole text (also JSON-escaped: escaping is per character), so a
                # copy of the whole text is found through its pieces; one pattern less per target
                pieces = pieces[1:]
            for piece in pieces:
                for enc in _encodings(piece):
                    nd.add(enc, i, "text")
        if t.content_hash:
            nd.add(t.content_hash.encode(), i, "content_hash")
        if t.record_id:
            nd.exact_ids.setdefault(t.record_id, []).append(i)
            if len(t.record_id) >= MIN_RAW_ID:
                for enc in _encodings(t.record_id):
                    nd.add(enc, i, "record_id", bounded=True)
    if report is not None:
        if shared:
            report.notes.append(
                f"{shared} target text(s) also occur in kept records: searched by hash and id only"
            )
        no_text = sum(1 for t in targets if not t.text)
        if no_text:
            report.notes.append(f"{no_text} target(s) without text: searched by content hash (and id) only")
        short = sorted({t.record_id for t in targets if t.record_id and len(t.record_id) < MIN_RAW_ID})
        if short:
            report.notes.append(
                f"record id(s) shorter than {MIN_RAW_ID} characters matched as exact Parquet values only: "
                + ", ".join(short[:10])
            )
    return nd


# ---- searching one blob, file or stream ----


def _parquet_hits(source, nd: _Needles) -> set[tuple[int, str]]:
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


def _decoded(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """Decoded forms of `data`: compressed streams and base64 payloads inside JSON (two levels deep)."""
    if depth > 1 or len(data) < 4:
        return
    out: list[bytes] = []
    head = data[:6]
    with contextlib.suppress(Exception):
        if head[:2] == b"\x1f\x8b":
            out.append(gzip.decompress(data))
        elif head == b"\xfd7zXZ\x00" or head[:3] == b"\x5d\x00\x00":
            out.append(lzma.decompress(data))
        elif head[:3] == b"BZh":
            out.append(bz2.decompress(data))
        elif head[0] == 0x78 and head[1] in (0x01, 0x5E, 0x9C, 0xDA):
            out.append(zlib.decompress(data))
    stripped = data.lstrip()
    if stripped[:1] in (b"{", b"[") and len(data) <= IN_MEMORY_BYTES:
        with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
            out.extend(_b64_values(json.loads(data)))
    for d in out:
        yield d
        yield from _decoded(d, depth + 1)


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
    data: bytes, nd: _Needles, notes: list[str] | None = None, label: str = ""
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
    for decoded in _decoded(data):
        hits |= nd.search(decoded)
        if _is_parquet(decoded):
            with contextlib.suppress(Exception):
                hits |= _parquet_hits(pa.BufferReader(decoded), nd)
    return hits


def _search_stream(fh: io.RawIOBase | io.BufferedIOBase, nd: _Needles) -> set[tuple[int, str]]:
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
    path: Path, nd: _Needles, report: ScanReport, label: str, seen: dict[bytes, set] | None = None
) -> set[tuple[int, str]]:
    """Every (target, what) found in the file at `path`. With `seen`, a content already searched (the DVC
    cache and remote hold the same bytes as the workspace's outputs) is not searched again: its hits are
    reused, so every place that holds a copy is still named."""
    size = path.stat().st_size
    report.files_scanned += 1
    report.bytes_scanned += size
    if size <= IN_MEMORY_BYTES:
        data = path.read_bytes()
        if seen is None:
            return search_bytes(data, nd, report.notes, label)
        key = hashlib.blake2b(data, digest_size=20).digest()
        if key not in seen:
            seen[key] = search_bytes(data, nd, report.notes, label)
        return set(seen[key])
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(-4, os.SEEK_END)
        parquet = head == b"PAR1" and fh.read(4) == b"PAR1"
        fh.seek(0)
        hits = _search_stream(fh, nd)
    if parquet:
        try:
            hits |= _parquet_hits(path, nd)
        except Exception as exc:
            report.notes.append(f"{label}: not readable as Parquet ({exc}); searched raw only")
    return hits


# ---- places ----


def _add(report: ScanReport, targets: list[Target], hits: set[tuple[int, str]], where: str) -> None:
    for i, what in sorted(hits):
        t = targets[i]
        report.findings.append(Finding(t.request_id, where, what, t.record_id))


def _walk_files(
    root: Path, prune: set[Path], excluded: set[Path], report: ScanReport, label
) -> Iterator[Path]:
    """Regular files under `root` (symlinks not followed), minus pruned directories and excluded files."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = [n for n in sorted(dirnames) if n != ".git" and d / n not in prune]
        for name in sorted(filenames):
            p = d / name
            if p in excluded:
                continue
            try:
                st = p.lstat()
            except OSError as exc:
                report.skipped.append(f"{label(p)}: unreadable ({exc.strerror})")
                continue
            if stat.S_ISLNK(st.st_mode):
                continue  # the target is scanned where it lives (DVC symlink/hardlink caches are scanned too)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size > MAX_FILE_BYTES:
                report.skipped.append(f"{label(p)}: {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte limit")
                continue
            yield p


def _scan_tree(
    root: Path,
    prefix: str,
    nd: _Needles,
    targets: list[Target],
    report: ScanReport,
    prune: set[Path] = frozenset(),  # type: ignore[assignment]
    excluded: set[Path] = frozenset(),  # type: ignore[assignment]
    text_only: set[Path] = frozenset(),  # type: ignore[assignment]
    seen: dict[bytes, set] | None = None,
) -> None:
    if not root.is_dir():
        return

    def label(p: Path) -> str:
        return prefix + p.relative_to(root).as_posix()

    for p in _walk_files(root, set(prune), set(excluded), report, label):
        try:
            hits = search_file(p, nd, report, label(p), seen)
        except OSError as exc:
            report.skipped.append(f"{label(p)}: unreadable ({exc.strerror or exc})")
            continue
        if any(_within(p, d) for d in text_only):
            hits = {h for h in hits if h[1] == "text"}
        _add(report, targets, hits, label(p))


def _dvc_dirs(ws: Workspace, report: ScanReport) -> tuple[Path | None, Path | None]:
    """(DVC cache directory, local DVC remote directory), each None when there is none."""
    from sisaflow.versioning import _run

    if not (ws.root / ".dvc").is_dir():
        report.notes.append("no .dvc directory: no DVC cache or remote to search")
        return None, None
    cache: Path | None = ws.root / ".dvc" / "cache"
    try:
        out = _run(ws, "dvc", "cache", "dir").stdout.strip()
        if out:
            cache = Path(out)
    except SisaflowError as exc:
        report.notes.append(f"`dvc cache dir` failed ({exc}); searching .dvc/cache")
    remote = remote_dir(ws, report.notes)
    return cache, remote


def default_remote(ws: Workspace) -> tuple[str, str, Path | None]:
    """(name, url, local directory) of the default DVC remote: ("", "", None) when none is configured, and
    local directory None when the remote is not a local path."""
    from sisaflow.versioning import _run

    name = _run(ws, "dvc", "remote", "default", check=False).stdout.strip()
    if not name:
        return "", "", None
    url = _run(ws, "dvc", "config", f"remote.{name}.url", check=False).stdout.strip()
    if url.startswith("file://"):
        path = url[len("file://") :]
    elif "://" in url or not url:
        return name, url, None
    else:
        path = url
    p = Path(path)
    if not p.is_absolute():
        p = ws.root / ".dvc" / p  # DVC stores a relative remote path relative to .dvc/config
    return name, url, p.resolve()


def remote_dir(ws: Workspace, notes: list[str]) -> Path | None:
    """The default DVC remote's directory when it is local; None (with a note) otherwise."""
    name, url, local = default_remote(ws)
    if not name:
        notes.append("no default DVC remote configured")
    elif local is None:
        notes.append(f"DVC remote {name!r} ({url or 'no url'}) is not a local directory: not searched")
    return local


# ---- git ----


def _git(ws: Workspace, *args: str) -> subprocess.CompletedProcess:
    from sisaflow.versioning import _env

    return subprocess.run(["git", *args], cwd=ws.root, env=_env(ws), capture_output=True)


def _ledger_shaped(data: bytes) -> bool:
    """A ledger file's content (JSON lines with a request_id each), e.g. an uncommitted ledger blob."""
    lines = [ln for ln in data.splitlines() if ln.strip()]
    try:
        return bool(lines) and all(
            isinstance(o := json.loads(ln), dict) and "request_id" in o for ln in lines
        )
    except ValueError:
        return False


def _scan_git(
    ws: Workspace,
    nd: _Needles,
    targets: list[Target],
    report: ScanReport,
    excluded: list[str],
    text_only: list[str],
) -> None:
    """Every object of the repository (commits, tags, blobs; reachable or not, loose or packed). `excluded` and
    `text_only` are paths relative to the workspace."""
    top = _git(ws, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        report.notes.append("the workspace is not in a git repository: no git history to search")
        return
    root = Path(top.stdout.decode().strip()).resolve()

    def rel(paths: list[str]) -> list[str]:
        return [Path(os.path.relpath(ws.root / e, root)).as_posix() for e in paths]

    excluded_git, text_only_git = rel(excluded), rel(text_only)
    # blob -> first path seen, for everything reachable from refs and reflogs
    paths: dict[str, str] = {}
    listing = _git(ws, "rev-list", "--all", "--reflog", "--objects")
    for line in listing.stdout.decode("utf-8", "replace").splitlines():
        sha, _, path = line.partition(" ")
        if path and sha not in paths:
            paths[sha] = path

    def under(path: str, places: list[str]) -> bool:
        return any(path == e or path.startswith(e.rstrip("/") + "/") for e in places)

    hits_by_object: dict[str, tuple[str, set[tuple[int, str]]]] = {}
    proc = subprocess.Popen(
        ["git", "cat-file", "--batch-all-objects", "--batch", "--unordered"],
        cwd=ws.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    out = proc.stdout
    try:
        while True:
            header = out.readline()
            if not header:
                break
            sha_b, kind_b, size_b = header.split()
            sha, kind, size = sha_b.decode(), kind_b.decode(), int(size_b)
            skip = kind == "tree" or (sha in paths and under(paths[sha], excluded_git))
            only_text = sha in paths and under(paths[sha], text_only_git)
            hits: set[tuple[int, str]] = set()
            if skip:
                _drain(out, size)
            elif size > IN_MEMORY_BYTES:
                hits = _search_stream(_Limited(out, size), nd)
            else:
                data = out.read(size)
                hits = search_bytes(data, nd, report.notes, f"git object {sha}")
                only_text = only_text or (bool(hits) and sha not in paths and _ledger_shaped(data))
            out.read(1)  # the newline after each object
            report.git_objects_scanned += 1
            if only_text:
                hits = {h for h in hits if h[1] == "text"}
            if hits:
                hits_by_object[sha] = (kind, hits)
    finally:
        out.close()
        proc.wait()
    for sha, (kind, hits) in sorted(hits_by_object.items()):
        if kind == "commit":
            where = f"git:{sha}:(commit message)"
        elif kind == "tag":
            where = f"git:{sha}:(tag)"
        elif sha in paths:
            log_ = _git(ws, "log", "--all", "--reflog", "--format=%H", f"--find-object={sha}")
            commits = log_.stdout.decode().split()
            where = f"git:{commits[-1] if commits else 'unknown'}:{paths[sha]}"
        else:
            where = f"git:unreachable:{sha}"
        _add(report, targets, hits, where)


class _Limited(io.RawIOBase):
    """The next `n` bytes of a stream, as a stream."""

    def __init__(self, fh, n: int) -> None:
        self.fh, self.left = fh, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.fh.read(size) if size else b""
        self.left -= len(data)
        return data


def _drain(fh, n: int) -> None:
    while n > 0:
        chunk = fh.read(min(n, CHUNK))
        if not chunk:
            break
        n -= len(chunk)


# ---- the scan ----


def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def scan_report(ws: Workspace, params: Params, targets: list[Target]) -> ScanReport:
    """Search every place for `targets`; the findings plus what was excluded, skipped and noted."""
    report = ScanReport()
    targets = list(targets)
    if not targets:
        report.notes.append("no targets")
        return report
    kept = _kept_texts(ws, params, {t.content_hash for t in targets}, report)
    nd = build_needles(targets, params.corpus.text_template, kept, report)

    source = ws.source(params.corpus.path).resolve()
    # evaluation inputs named in params are the user's files too (TOFU's perturbed file holds the forget set's
    # questions and answers by design); like the corpus source, sisaflow never writes them
    inputs = [ws.source(p).resolve() for p in (params.evaluate.holdout, params.evaluate.tofu_perturbed) if p]
    report.excluded += [
        "deletions/ (the deletion ledger; in git history too): ids and content hashes allowed, text reported",
        "reports/certificates/ (deletion certificates; in git history too): ids and content hashes allowed, "
        "text reported",
        "ledger-shaped git objects no commit references: ids and content hashes allowed, text reported",
        f"{source} (the corpus source: the user's input, which sisaflow never writes; in git history too)",
        *[
            f"{p} (an evaluation input named in params: the user's file, never written; in git history too)"
            for p in inputs
        ],
    ]
    excluded_rel = [p.relative_to(ws.root).as_posix() for p in (source, *inputs) if _within(p, ws.root)]
    text_only = {ws.root / d for d in HASH_ONLY_DIRS}

    cache, remote = _dvc_dirs(ws, report)
    prune = {ws.prefect_home.resolve()}
    # Python virtual environments inside the workspace (the repository's own .venv): installed packages,
    # where sisaflow never writes data
    for child in sorted(ws.root.iterdir()):
        if child.is_dir() and (child / "pyvenv.cfg").is_file():
            prune.add(child.resolve())
            report.excluded.append(f"{child} (a Python virtual environment: installed packages only)")
    for d in (cache, remote):
        if d is not None:
            prune.add(d.resolve())

    seen: dict[bytes, set] = {}  # content digest -> hits: each distinct content is searched once
    _scan_tree(
        ws.root,
        "",
        nd,
        targets,
        report,
        prune=prune,
        excluded={source, *inputs},
        text_only=text_only,
        seen=seen,
    )
    if cache is not None:
        _scan_tree(cache, "dvc-cache:", nd, targets, report, seen=seen)
    if remote is not None:
        if remote.is_dir():
            _scan_tree(remote, "dvc-remote:", nd, targets, report, seen=seen)
        else:
            report.notes.append(f"DVC remote {remote} does not exist (nothing pushed yet)")
    _scan_tree(ws.prefect_home, "prefect-home:", nd, targets, report, seen=seen)
    if ws.ray_tmp_dir.is_dir():
        _scan_tree(ws.ray_tmp_dir, "ray-tmp:", nd, targets, report, seen=seen)
    _scan_git(ws, nd, targets, report, excluded_rel, list(HASH_ONLY_DIRS))
    report.findings = sorted(set(report.findings), key=lambda f: (f.request_id, f.where, f.what, f.record_id))
    return report


def scan(ws: Workspace, params: Params, targets: list[Target]) -> list[Finding]:
    """Every copy of `targets` left anywhere (see the module docstring); empty when none is."""
    return scan_report(ws, params, targets).findings
