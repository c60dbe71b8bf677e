"""What a scan for deleted records looks for, and what it reports.

A target is a deleted record: its content hash, and, when the corpus source still has it, its id and text.
`build_needles` turns targets into byte patterns: the text (UTF-8, and as it reads inside JSON) or its
distinctive pieces (a template field or line of at least MIN_DISTINCT characters that no kept record contains),
the content hash, and the record id as a whole token. sisaflow.scan.formats searches bytes for them;
sisaflow.scan.places decides where.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields

from sisaflow.core.config import Params
from sisaflow.core.errors import SisaflowError
from sisaflow.core.hashing import workspace_hasher
from sisaflow.core.paths import Workspace
from sisaflow.scan.patterns import PatternIndex

MIN_DISTINCT = 40
"""Shortest piece of a text (template field or line) searched on its own."""
MAX_DISTINCT_PIECES = 3
MIN_RAW_ID = 4
"""Shorter record ids are matched only as exact Parquet values (as raw bytes they would match anywhere)."""
_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


@dataclass(frozen=True)
class Target:
    """A deleted record to look for. `text` is None when only the hash (and maybe the id) is known."""

    request_id: str
    record_id: str
    content_hash: str
    text: str | None = field(default=None, repr=False)
    """The deleted text: never in a repr, so never in a log line or a traceback that prints the target."""


@dataclass(frozen=True)
class Finding:
    """A copy of a target: where ('<relative path>', 'git:<commit>:<path>', 'dvc-cache:<path>',
    'dvc-remote:<path>', 'prefect-home:<path>', 'ray-tmp:<path>') and what ('text' | 'content_hash' |
    'record_id', or 'weights' | 'optimizer-state': a retired checkpoint's weights or optimizer file, byte for
    byte, whose checkpoint name (shard-N/slice-K) is then in record_id)."""

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

    def to_json(self) -> dict:
        return {**asdict(self), "location_kind": self.location_kind}

    @classmethod
    def from_json(cls, raw: dict) -> Finding:
        return cls(raw["request_id"], raw["where"], raw["what"], raw.get("record_id", ""))


@dataclass
class ScanReport:
    findings: list[Finding] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_scanned: int = 0
    bytes_scanned: int = 0
    git_objects_scanned: int = 0
    unsearched: dict[str, int] = field(default_factory=dict)
    """Places left out, by kind (corpus-source, evaluation-input, dvc-remote, prefect-home, prefect-server,
    prefect-database, prefect-result-storage): counts, never paths."""
    source_holds: int | None = None
    """How many of the targets' records the corpus source still holds (None: the source was not readable).
    Only those have text to look for; the rest are searched by content hash alone."""

    @property
    def clean(self) -> bool:
        return not self.findings

    def add(self, targets: list[Target], hits: set[tuple[int, str]], where: str) -> None:
        """Record what a search of one place found: `hits` are (index into `targets`, what) pairs."""
        for i, what in sorted(hits):
            t = targets[i]
            self.findings.append(Finding(t.request_id, where, what, t.record_id))

    def not_searchable(self, kind: str, note: str) -> None:
        """Count a place of `kind` that could not be searched, with a note saying which and why."""
        self.unsearched[kind] = self.unsearched.get(kind, 0) + 1
        self.notes.append(note)

    def not_searched(self) -> dict[str, int]:
        """What a certificate may say of the scan's coverage: kinds of place left out and files skipped."""
        out = dict(self.unsearched)
        if self.skipped:
            out["skipped-file"] = len(self.skipped)
        return dict(sorted(out.items()))

    def findings_by_location(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.location_kind] = out.get(f.location_kind, 0) + 1
        return dict(sorted(out.items()))

    def to_json(self) -> dict:
        out = asdict(self)
        out["findings"] = [f.to_json() for f in self.findings]
        out["findings_by_location"] = self.findings_by_location()
        out["clean"] = self.clean
        out["not_searched"] = self.not_searched()
        return out

    @classmethod
    def from_json(cls, raw: dict) -> ScanReport:
        """The report `to_json` wrote (its derived counts are recomputed)."""
        plain = {f.name for f in fields(cls)} - {"findings"}
        out = cls(**{k: v for k, v in raw.items() if k in plain})
        out.findings = [Finding.from_json(f) for f in raw.get("findings", [])]
        return out


@dataclass(frozen=True)
class RetiredFile:
    """A file of a checkpoint a deletion retired: its weights, or its optimizer state (AdamW's moments are running
    sums of the deleted records' gradients)."""

    request_id: str
    checkpoint: str
    """shard-N/slice-K"""
    kind: str
    """'weights' or 'optimizer-state': what a finding of a copy says it found."""
    bytes: int


class RetiredFiles:
    """Retired checkpoints' files, looked for by size, then sha256: a copy of a model, or of the optimizer state,
    trained on deleted records is a copy of them too."""

    def __init__(self, retired: Mapping[str, RetiredFile]):
        self.retired = dict(retired)
        self.sizes = {f.bytes for f in self.retired.values()}

    def check(self, report: ScanReport, where: str, size: int, digest) -> None:
        """`digest()` gives the sha256 hex digest (called only for a blob of a retired file's size)."""
        if size in self.sizes:
            found = self.retired.get(digest())
            if found:
                report.findings.append(Finding(found.request_id, where, found.kind, found.checkpoint))


# ---- targets ----


def targets_from_source(
    ws: Workspace,
    params: Params,
    content_hashes: Mapping[str, str] | Iterable[str],
    request_id: str = "",
) -> list[Target]:
    """Targets for `content_hashes`: with id and text for those whose record is in the corpus source, hash-only
    for the rest. `content_hashes` is a set of hashes (all under `request_id`) or a {hash: request_id} map."""
    from sisaflow.data.corpus import read_records

    wanted = (
        dict(content_hashes)
        if isinstance(content_hashes, Mapping)
        else dict.fromkeys(content_hashes, request_id)
    )
    out: list[Target] = []
    for r in read_records(ws.source(params.corpus.path), params.corpus, workspace_hasher(ws, params.corpus)):
        if r.content_hash in wanted:
            out.append(Target(wanted.pop(r.content_hash), r.record_id, r.content_hash, r.text))
    out.extend(Target(req, "", h, None) for h, req in sorted(wanted.items()))
    return out


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
class Needles:
    """Byte patterns to search, each naming the (target index, what) pairs it proves."""

    patterns: dict[bytes, list[tuple[int, str]]] = field(default_factory=dict, repr=False)
    bounded: set[bytes] = field(default_factory=set, repr=False)
    """Both hold pieces of deleted texts: no repr."""
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


def kept_texts(ws: Workspace, params: Params, target_hashes: set[str], report: ScanReport) -> str | None:
    """The texts of every source record that is not a target, joined (to drop pieces they share); counts the
    targets the source still holds into `report`."""
    from sisaflow.data.corpus import read_records

    try:
        records = read_records(
            ws.source(params.corpus.path), params.corpus, workspace_hasher(ws, params.corpus)
        )
    except SisaflowError as exc:
        report.notes.append(
            f"corpus source not readable ({exc}): text pieces are not checked for distinctness"
        )
        return None
    report.source_holds = sum(r.content_hash in target_hashes for r in records)
    return "\x00".join(r.text for r in records if r.content_hash not in target_hashes)


def build_needles(
    targets: list[Target], template: str | None, kept: str | None, report: ScanReport | None = None
) -> Needles:
    """The byte patterns for `targets`; text pieces that a kept record also contains are left out."""
    nd = Needles()
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
