"""Reading a corpus file into records (record_id, owner, text, content_hash), with errors that name the line.

The imported corpus (corpus/records.parquet) is the source minus every record a deletion request names, so
re-importing never brings a forgotten record back.
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sisaflow.core.config import CorpusParams
from sisaflow.core.errors import CorpusError
from sisaflow.core.fsio import atomic_path, digest

RECORD_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("owner", pa.string()),
        ("text", pa.string()),
        ("content_hash", pa.string()),
    ]
)


def content_hash(record_id: str, text: str) -> str:
    """The hash that lineage, logs and certificates carry instead of the text."""
    return digest(("sisaflow-record-v1", record_id, text))


@dataclass(frozen=True)
class Record:
    record_id: str
    owner: str
    text: str
    content_hash: str


def source_rows(path: Path, fmt: str) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """Yield (location, row) pairs; location is 'file:line' for error messages."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(
                        f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise CorpusError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}:{n}", row
    elif fmt == "csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: tolerate a byte-order mark
            reader = csv.DictReader(fh)
            try:
                for row in reader:
                    if None in row:
                        raise CorpusError(f"{path}:{reader.line_num}: more fields than the header names")
                    yield f"{path}:{reader.line_num}", row
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


def required_field(row: dict[str, Any], name: str, where: str) -> str:
    if name not in row:
        raise CorpusError(
            f"{where}: missing field {name!r} (fields present: {', '.join(sorted(row)) or 'none'})"
        )
    value = row[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CorpusError(f"{where}: field {name!r} is empty")
    return str(value)


def check_label(row: dict[str, Any], params: CorpusParams, where: str) -> str:
    """The row's class, which must be one of corpus.labels (a class name is not record content)."""
    label = required_field(row, params.label_field or "", where)
    if label not in (params.labels or []):
        raise CorpusError(
            f"{where}: field {params.label_field!r} is {label!r}, not one of the classes in corpus.labels "
            f"({', '.join(params.labels or [])})"
        )
    return label


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def read_records(path: Path, params: CorpusParams) -> list[Record]:
    """Read and validate every record of a corpus file; raise CorpusError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: corpus file is empty")
    records: list[Record] = []
    seen: dict[str, str] = {}
    n = 0
    for where, row in source_rows(path, params.format):
        n += 1
        if isinstance(row, str):  # txt: one record per non-empty line
            record_id, owner, text = f"line-{where.rsplit(':', 1)[1]}", None, row
        else:
            record_id = required_field(row, params.id_field, where) if params.id_field else f"row-{n}"
            owner = required_field(row, params.owner_field, where) if params.owner_field else None
            if params.text_field:
                text = required_field(row, params.text_field, where)
            else:
                for name in template_fields(params.text_template or ""):
                    required_field(row, name, where)
                if params.label_field:
                    check_label(row, params, where)
                text = (params.text_template or "").format(**row)
        if record_id in seen:
            raise CorpusError(f"{where}: duplicate record id {record_id!r} (first seen at {seen[record_id]})")
        seen[record_id] = where
        owner = owner if owner is not None else record_id
        records.append(Record(record_id, owner, text, content_hash(record_id, text)))
    if not records:
        raise CorpusError(f"{path}: corpus holds no records")
    return records


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


def import_corpus(
    source: Path, params: CorpusParams, target: Path, excluded_owners: set[str], excluded_records: set[str]
) -> dict[str, int]:
    """Read the source, drop records named by deletion requests, and write the imported corpus."""
    records = read_records(source, params)
    kept = [r for r in records if r.owner not in excluded_owners and r.record_id not in excluded_records]
    # every record deleted is a valid state: the ensemble becomes empty and generate says so
    write_table(target, to_table(kept))
    return {"read": len(records), "excluded": len(records) - len(kept), "records": len(kept)}
