"""Reading a corpus file into records (record_id, owner, text, content_hash), with errors that name the line.

The imported corpus (corpus/records.parquet) is the source minus every record a deletion request names, and
minus every record that carries a deleted record's text under another id or owner, so re-importing never brings
a forgotten record back. A corpus without an id field gets ids derived from each record's text, never from its
position: inserting a line cannot move a deletion onto another record.
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sisaflow.core.config import CorpusParams
from sisaflow.core.errors import CorpusError
from sisaflow.core.fsio import atomic_path, read_json, write_json
from sisaflow.core.hashing import PLAIN, Hasher

RECORD_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("owner", pa.string()),
        ("text", pa.string()),
        ("content_hash", pa.string()),
    ]
)

SKIP_HINT = (
    " (to import the valid records and report the others by file and line, set corpus.skip_invalid: true in "
    "params.yaml, or pass `sisaflow init --skip-invalid`)"
)


def content_hash(record_id: str, text: str, hasher: Hasher = PLAIN) -> str:
    """The hash that lineage, logs and certificates carry instead of the text (keyed by the workspace's hash key
    where it has one: core.hashing)."""
    return hasher(("sisaflow-record-v1", record_id, text))


def text_hash(text: str, hasher: Hasher = PLAIN) -> str:
    """A hash of the text alone: what a deletion holds for, whatever id or owner the text comes back under."""
    return hasher(("sisaflow-text-v1", text))


def content_id(text: str, hasher: Hasher = PLAIN) -> str:
    """The id of a record in a corpus without ids: 'sha-' and the first 16 hex digits of its text hash."""
    return "sha-" + text_hash(text, hasher)[:16]


def _check_hasher(params: CorpusParams, hasher: Hasher) -> None:
    if hasher.key_id != params.hash_key:
        raise CorpusError(
            f"corpus.hash_key is {params.hash_key or 'none'} but the records were to be hashed with "
            f"{hasher.key_id or 'no key'}: a caller did not pass the workspace's hasher (core.hashing.hasher_for)"
        )


@dataclass(frozen=True)
class Record:
    record_id: str
    owner: str
    text: str = field(repr=False)
    """Never in a repr, so never in a log line or a traceback that prints the record (it may be deleted)."""
    content_hash: str


class InvalidRecord(CorpusError):
    """One record of the source cannot be read; `reason` says why without quoting the record."""

    def __init__(self, where: str, message: str, reason: str | None = None):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
        self.reason = reason or message

    @property
    def location(self) -> str:
        """'file:line: reason', with no value of the record: what a report of skipped records shows."""
        return f"{self.where}: {self.reason}"


def _rows(path: Path, fmt: str) -> Iterator[tuple[str, dict[str, Any] | str | InvalidRecord]]:
    """Yield (location, row) pairs, or (location, InvalidRecord) for a row that cannot be read and can be
    passed over; errors after which the file cannot be read on are raised."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                where = f"{path}:{n}"
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield (
                        where,
                        InvalidRecord(
                            where, f"malformed JSON ({exc.msg} at column {exc.colno})", "malformed JSON"
                        ),
                    )
                    continue
                if not isinstance(row, dict):
                    yield (
                        where,
                        InvalidRecord(
                            where, f"expected a JSON object, got {type(row).__name__}", "not a JSON object"
                        ),
                    )
                    continue
                yield where, row
    elif fmt == "csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: tolerate a byte-order mark
            reader = csv.DictReader(fh)
            try:
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if None in row:
                        yield where, InvalidRecord(where, "more fields than the header names")
                        continue
                    yield where, row
            except csv.Error as exc:
                raise CorpusError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    elif fmt == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
        for n, row in enumerate(table.to_pylist()):
            yield f"{path}: row {n}", row
    elif fmt == "txt":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield f"{path}:{n}", line.rstrip("\n")
    else:
        raise CorpusError(f"unknown corpus format {fmt!r}; choose one of jsonl, parquet, csv, txt")


def source_rows(path: Path, fmt: str) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """Yield (location, row) pairs; location is 'file:line' for error messages. A row that cannot be read
    raises InvalidRecord naming the file and line."""
    for where, row in _rows(path, fmt):
        if isinstance(row, InvalidRecord):
            raise row
        yield where, row


def required_field(row: dict[str, Any], name: str, where: str) -> str:
    if name not in row:
        raise InvalidRecord(
            where,
            f"missing field {name!r} (fields present: {', '.join(sorted(row)) or 'none'})",
            f"missing field {name!r}",
        )
    value = row[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidRecord(where, f"field {name!r} is empty")
    return str(value)


def check_label(row: dict[str, Any], params: CorpusParams, where: str) -> str:
    """The row's class, which must be one of corpus.labels (a class name is not record content)."""
    label = required_field(row, params.label_field or "", where)
    if label not in (params.labels or []):
        raise InvalidRecord(
            where,
            f"field {params.label_field!r} is {label!r}, not one of the classes in corpus.labels "
            f"({', '.join(params.labels or [])})",
            f"field {params.label_field!r} is not one of the classes in corpus.labels",
        )
    return label


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


@dataclass(frozen=True)
class SourceRead:
    """What reading a corpus source gave."""

    records: list[Record]
    skipped: list[str]
    """Invalid records passed over (corpus.skip_invalid): 'file:line: reason', never a value of the record."""
    positional_ids: list[str] | None = None
    """For a corpus without ids, the id each record had before ids were derived from the text ('line-N',
    'row-N'), in the order of `records`: a ledger written then names these. None when the corpus has ids."""


def _text_of(row: dict[str, Any], params: CorpusParams, where: str) -> str:
    if params.text_field:
        return required_field(row, params.text_field, where)
    for name in template_fields(params.text_template or ""):
        required_field(row, name, where)
    if params.label_field:
        check_label(row, params, where)
    return (params.text_template or "").format(**row)


def read_source(
    path: Path, params: CorpusParams, skip_invalid: bool | None = None, hasher: Hasher = PLAIN
) -> SourceRead:
    """Read and validate every record of a corpus file. An invalid record raises InvalidRecord naming the file
    and line, or with `skip_invalid` (default: corpus.skip_invalid) is passed over and listed in `skipped`.
    `hasher` is the workspace's (it must be the key params.corpus.hash_key names)."""
    _check_hasher(params, hasher)
    path = Path(path)
    skip = params.skip_invalid if skip_invalid is None else skip_invalid
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: corpus file is empty")
    records: list[Record] = []
    skipped: list[str] = []
    positional: list[str] = []
    seen: dict[str, str] = {}
    repeats: dict[str, int] = {}
    by_content = params.format == "txt" or not params.id_field
    n = 0
    for where, row in _rows(path, params.format):
        n += 1
        try:
            if isinstance(row, InvalidRecord):
                raise row
            if isinstance(row, str):  # txt: one record per non-empty line
                record_id, owner, text, was = "", None, row, f"line-{where.rsplit(':', 1)[1]}"
            else:
                record_id = required_field(row, params.id_field, where) if params.id_field else ""
                owner = required_field(row, params.owner_field, where) if params.owner_field else None
                text, was = _text_of(row, params, where), f"row-{n}"
            if by_content:
                # the k-th record with the same text (in file order) gets '-k': ids stay unique, and every
                # copy of a text is left out with it, as a deletion holds for the text
                record_id = content_id(text, hasher)
                repeats[record_id] = repeats.get(record_id, 0) + 1
                if repeats[record_id] > 1:
                    record_id += f"-{repeats[record_id]}"
            if record_id in seen:
                raise InvalidRecord(
                    where,
                    f"duplicate record id {record_id!r} (first seen at {seen[record_id]})",
                    f"duplicate record id (first seen at {seen[record_id]})",
                )
        except InvalidRecord as exc:
            if not skip:
                raise InvalidRecord(exc.where, exc.message + SKIP_HINT, exc.reason) from None
            skipped.append(exc.location)
            continue
        seen[record_id] = where
        positional.append(was)
        owner = owner if owner is not None else record_id
        records.append(Record(record_id, owner, text, content_hash(record_id, text, hasher)))
    if not records:
        detail = f" ({len(skipped)} invalid record(s) skipped, first {skipped[0]})" if skipped else ""
        raise CorpusError(f"{path}: corpus holds no records{detail}")
    return SourceRead(records, skipped, positional if by_content else None)


def read_records(path: Path, params: CorpusParams, hasher: Hasher = PLAIN) -> list[Record]:
    """Read and validate every record of a corpus file; raise CorpusError naming the file and line (invalid
    records are passed over instead with corpus.skip_invalid)."""
    return read_source(path, params, hasher=hasher).records


def to_table(records: list[Record]) -> pa.Table:
    """Records as an Arrow table in canonical order (by record id)."""
    ordered = sorted(records, key=lambda r: r.record_id)
    return pa.table(
        {
            "record_id": [r.record_id for r in ordered],
            "owner": [r.owner for r in ordered],
            "text": [r.text for r in ordered],
            "content_hash": [r.content_hash for r in ordered],
        },
        schema=RECORD_SCHEMA,
    )


def from_table(table: pa.Table) -> list[Record]:
    cols = table.select(["record_id", "owner", "text", "content_hash"]).to_pydict()
    return [Record(*row) for row in zip(cols["record_id"], cols["owner"], cols["text"], cols["content_hash"])]


def write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically (deterministic bytes for the same table)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_table(path: Path) -> pa.Table:
    return pq.read_table(path)


@dataclass(frozen=True)
class Exclusions:
    """What the deletion ledger says an import must leave out."""

    owners: frozenset[str] = frozenset()
    records: frozenset[str] = frozenset()
    text_hashes: frozenset[str] = frozenset()
    """The text hashes of deleted records: a record with one of these texts is left out, whatever its id."""
    content_hashes: frozenset[str] = frozenset()
    """The content hashes of deleted records: a source record that still has one (or had one under its old
    positional id) adds its text to `text_hashes`, for requests recorded before text hashes were kept."""


@dataclass
class ImportReport:
    """What an import did (the run report's `imported`, and corpus/import.json for `sisaflow status`)."""

    read: int = 0
    """Valid records in the source."""
    excluded: int = 0
    """Records left out by deletion requests (named by owner or id, or carrying a deleted text)."""
    refused: int = 0
    """Of those, the ones left out by their text alone: a deleted record's text under another id or owner."""
    records: int = 0
    """Records imported."""
    skipped: list[str] = field(default_factory=list)
    """Invalid records passed over (corpus.skip_invalid): 'file:line: reason', never a value of the record."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> ImportReport:
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def summary(self, show: int = 10) -> str:
        """A line or a few for the terminal: never a record's text."""
        line = f"corpus: {self.records} records ({self.excluded} left out by deletion requests"
        if self.refused:
            line += f", {self.refused} of them by their text alone: a deleted record's text under another id"
        line += ")"
        if self.skipped:
            line += f"; {len(self.skipped)} invalid record(s) skipped (corpus.skip_invalid):"
            line += "".join(f"\n  {where}" for where in self.skipped[:show])
            if len(self.skipped) > show:
                line += f"\n  ... and {len(self.skipped) - show} more (corpus/import.json lists them all)"
        return line


def import_report_file(corpus_file: Path) -> Path:
    """Where the import beside `corpus_file` says what it left out and skipped (no text, no ids)."""
    return Path(corpus_file).with_name("import.json")


def read_import_report(corpus_file: Path) -> ImportReport | None:
    """The last import's report beside `corpus_file`; None before the first (or before this file existed)."""
    path = import_report_file(corpus_file)
    return ImportReport.from_json(read_json(path)) if path.is_file() else None


def import_corpus(
    source: Path, params: CorpusParams, target: Path, exclusions: Exclusions, hasher: Hasher = PLAIN
) -> ImportReport:
    """Read the source, drop every record the deletion ledger rules out, write the imported corpus and, beside
    it, the import's report. The result depends on the source, the ledger and the workspace's hash key only."""
    read = read_source(source, params, hasher=hasher)
    positional: list[str | None] = [None] * len(read.records)
    if read.positional_ids is not None:
        positional = list(read.positional_ids)
    texts = [text_hash(r.text, hasher) for r in read.records]
    deleted_texts = set(exclusions.text_hashes)
    for r, was, th in zip(read.records, positional, texts):
        if r.content_hash in exclusions.content_hashes or (
            was is not None and content_hash(was, r.text, hasher) in exclusions.content_hashes
        ):
            deleted_texts.add(th)
    kept, refused = [], 0
    for r, th in zip(read.records, texts):
        named = r.owner in exclusions.owners or r.record_id in exclusions.records
        if not named and th not in deleted_texts:
            kept.append(r)
        elif not named:
            refused += 1
    # every record deleted is a valid state: the ensemble becomes empty and generate says so
    write_table(target, to_table(kept))
    report = ImportReport(
        read=len(read.records),
        excluded=len(read.records) - len(kept),
        refused=refused,
        records=len(kept),
        skipped=read.skipped,
    )
    write_json(import_report_file(target), report.to_json())
    return report
