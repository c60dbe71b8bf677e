"""corpus: every format reads into the same records; every error names the file and the line."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sisaflow.core.config import CorpusParams
from sisaflow.core.errors import CorpusError
from sisaflow.data.corpus import (
    RECORD_SCHEMA,
    Exclusions,
    Record,
    content_hash,
    content_id,
    from_table,
    import_corpus,
    read_import_report,
    read_records,
    read_table,
    text_hash,
    to_table,
    write_table,
)

ROWS = [
    {"id": "a1", "author": "alice", "question": "Who?", "answer": "Alice."},
    {"id": "b1", "author": "bob", "question": "Where?", "answer": "Paris, France"},
    {"id": "a2", "author": "alice", "question": 'When "now"?', "answer": "Now ✓"},
]
TEMPLATE = "Q: {question}\nA: {answer}"
EXPECTED = [(r["id"], r["author"], TEMPLATE.format(**r)) for r in ROWS]


def params(fmt="jsonl", **kw) -> CorpusParams:
    base = dict(
        path="x", format=fmt, id_field="id", owner_field="author", text_field=None, text_template=TEMPLATE
    )
    base.update(kw)
    return CorpusParams(**base)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def triples(records):
    return [(r.record_id, r.owner, r.text) for r in records]


def test_content_hash_known_answer_stable_and_text_sensitive():
    h = hashlib.sha256()
    for part in ("sisaflow-record-v1", "r1", "hello"):
        b = part.encode()
        h.update(len(b).to_bytes(8, "big") + b)
    assert content_hash("r1", "hello") == h.hexdigest()
    # pinned: a change here would silently invalidate every lineage file, ledger hash and checkpoint chain
    assert content_hash("r1", "hello") == "6e1a8bf3dfe56b7f02be4899971b05683ea7670dd581e5f0d49f41cf70fb0909"
    assert content_hash("r1", "hello") == content_hash("r1", "hello")
    assert content_hash("r1", "hello") != content_hash("r1", "hello!")
    assert content_hash("r1", "hello") != content_hash("r2", "hello")
    assert content_hash("r1", "hello") != content_hash("r1h", "ello")


def test_jsonl_reads_records_in_file_order(tmp_path):
    recs = read_records(write_jsonl(tmp_path / "c.jsonl", ROWS), params())
    assert triples(recs) == EXPECTED
    for r in recs:
        assert r.content_hash == content_hash(r.record_id, r.text)


def test_jsonl_skips_blank_lines_and_accepts_integer_ids(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('\n{"id": 7, "author": 3, "t": "x"}\n   \n{"id": 8, "author": 3, "t": "y"}\n')
    recs = read_records(p, params(text_field="t", text_template=None))
    assert triples(recs) == [("7", "3", "x"), ("8", "3", "y")]


def test_csv_reads(tmp_path):
    p = tmp_path / "c.csv"
    with open(p, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "author", "question", "answer"])
        w.writeheader()
        w.writerows(ROWS)
    assert triples(read_records(p, params("csv"))) == EXPECTED


def test_parquet_reads(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert triples(read_records(p, params("parquet"))) == EXPECTED


def test_txt_reads_one_record_per_non_empty_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first line\n\nthird line\n")
    recs = read_records(p, params("txt", text_field=None, text_template=None))
    first, third = content_id("first line"), content_id("third line")
    assert triples(recs) == [(first, first, "first line"), (third, third, "third line")]


def test_same_data_gives_same_records_in_every_format(tmp_path):
    pj = write_jsonl(tmp_path / "c.jsonl", ROWS)
    pp = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), pp)
    assert read_records(pj, params()) == read_records(pp, params("parquet"))


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"id": "c1", "author": \n')
    with pytest.raises(CorpusError) as e:
        read_records(p, params())
    assert f"{p}:3" in str(e.value)
    assert "malformed JSON" in str(e.value)


def test_non_object_json_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(CorpusError, match=re.escape(f"{p}:2: expected a JSON object")):
        read_records(p, params())


@pytest.mark.parametrize(
    "drop,field_params",
    [
        ("id", {}),
        ("author", {}),
        ("text", {"text_field": "text", "text_template": None}),
        ("answer", {}),  # a field the template needs
    ],
)
def test_missing_field_names_the_field_and_line(tmp_path, drop, field_params):
    rows = [dict(r, text="t") for r in ROWS]
    del rows[1][drop]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(CorpusError) as e:
        read_records(p, params(**field_params))
    msg = str(e.value)
    assert f"{p}:2" in msg
    assert f"missing field {drop!r}" in msg


def test_empty_field_is_refused(tmp_path):
    rows = [dict(ROWS[0], author="  ")]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(CorpusError, match=re.escape(f"{p}:1: field 'author' is empty")):
        read_records(p, params())


def test_missing_field_csv_names_line(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,author,question\nx1,al,q?\n")
    with pytest.raises(CorpusError) as e:
        read_records(p, params("csv"))
    assert f"{p}:2" in str(e.value) and "'answer'" in str(e.value)


def test_csv_row_with_too_many_fields(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,author,question,answer\nx1,al,q,a\nx2,al,q,a,extra\n")
    with pytest.raises(CorpusError, match=re.escape(f"{p}:3")):
        read_records(p, params("csv"))


def test_duplicate_record_ids_name_both_locations(tmp_path):
    rows = [ROWS[0], ROWS[1], dict(ROWS[2], id="a1")]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(CorpusError) as e:
        read_records(p, params())
    msg = str(e.value)
    assert "duplicate record id 'a1'" in msg
    assert f"{p}:3" in msg and f"{p}:1" in msg


def test_empty_file(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        read_records(p, params())


def test_blank_only_file_holds_no_records(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n  \n\n")
    with pytest.raises(CorpusError, match="no records"):
        read_records(p, params())


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(CorpusError) as e:
        read_records(p, params())
    assert str(p) in str(e.value) and "not found" in str(e.value)


def test_unreadable_parquet(tmp_path):
    p = tmp_path / "c.parquet"
    p.write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match="Parquet"):
        read_records(p, params("parquet"))


def test_owner_defaults_to_record_id(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", ROWS)
    recs = read_records(p, params(owner_field=None))
    assert [r.owner for r in recs] == ["a1", "b1", "a2"]
    assert all(r.owner == r.record_id for r in recs)


def test_record_id_without_an_id_field_comes_from_the_text_never_the_position(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in ROWS]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    recs = read_records(p, params(id_field=None))
    assert [r.record_id for r in recs] == [content_id(TEMPLATE.format(**r)) for r in rows]
    assert all(re.fullmatch(r"sha-[0-9a-f]{16}", r.record_id) for r in recs)
    assert content_id("hello") == "sha-" + text_hash("hello")[:16]
    # a line inserted above changes no id; a repeated text gets a counter, in file order
    write_jsonl(p, [rows[1], rows[0], rows[1], rows[2], rows[1]])
    again = read_records(p, params(id_field=None))
    b = content_id(TEMPLATE.format(**rows[1]))
    assert [r.record_id for r in again] == [b, recs[0].record_id, b + "-2", recs[2].record_id, b + "-3"]


def test_table_round_trip_is_canonical_and_deterministic(tmp_path):
    recs = read_records(write_jsonl(tmp_path / "c.jsonl", ROWS), params())
    t = to_table(recs)
    assert t.schema == RECORD_SCHEMA
    assert t.column_names == ["record_id", "owner", "text", "content_hash"]
    assert t.column("record_id").to_pylist() == ["a1", "a2", "b1"]  # sorted by record id
    assert to_table(list(reversed(recs))).equals(t)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_table(a, t)
    write_table(b, to_table(list(reversed(recs))))
    assert a.read_bytes() == b.read_bytes()
    assert sorted(from_table(read_table(a)), key=lambda r: r.record_id) == sorted(
        recs, key=lambda r: r.record_id
    )
    assert all(isinstance(r, Record) for r in from_table(read_table(a)))


def test_import_corpus_excludes_owners_and_records(tmp_path):
    rows = ROWS + [{"id": "c1", "author": "carol", "question": "Why?", "answer": "Because."}]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    target = tmp_path / "corpus" / "records.parquet"
    counts = import_corpus(src, params(), target, Exclusions(frozenset({"alice"}), frozenset({"c1", "zzz"})))
    assert counts.to_json() == {"read": 4, "excluded": 3, "refused": 0, "records": 1, "skipped": []}
    kept = from_table(read_table(target))
    assert [r.record_id for r in kept] == ["b1"]
    assert kept[0].owner == "bob" and kept[0].content_hash == content_hash("b1", kept[0].text)
    counts = import_corpus(src, params(), target, Exclusions())
    assert (counts.read, counts.excluded, counts.records) == (4, 0, 4)
    assert read_import_report(target) == counts
    assert sorted(r.record_id for r in from_table(read_table(target))) == ["a1", "a2", "b1", "c1"]


def test_import_corpus_when_everything_is_excluded_is_empty(tmp_path):
    # every record deleted is a valid state: an empty corpus (the served ensemble becomes empty)
    src = write_jsonl(tmp_path / "c.jsonl", ROWS)
    target = tmp_path / "records.parquet"
    info = import_corpus(src, params(), target, Exclusions(owners=frozenset({"alice", "bob"})))
    assert info.records == 0 and info.excluded == info.read > 0
    assert read_table(target).num_rows == 0
