"""corpus import: a deletion holds for the text, whatever id or position it comes back under; invalid records
refuse the corpus by default and, with corpus.skip_invalid, are skipped and named by file and line only."""

from __future__ import annotations

import json

import pytest

from sisaflow.core.config import CorpusParams
from sisaflow.core.errors import CorpusError
from sisaflow.data.corpus import (
    Exclusions,
    content_hash,
    content_id,
    from_table,
    import_corpus,
    import_report_file,
    read_import_report,
    read_records,
    read_source,
    read_table,
    text_hash,
)

TXT = CorpusParams(
    path="x", format="txt", id_field=None, owner_field=None, text_field=None, text_template=None
)
JSONL = CorpusParams(path="x", id_field="id", owner_field="owner", text_field="text", text_template=None)


def deleting(records) -> Exclusions:
    """The exclusions a request naming `records` leaves in the ledger: ids, content and text hashes."""
    return Exclusions(
        records=frozenset(r.record_id for r in records),
        text_hashes=frozenset(text_hash(r.text) for r in records),
        content_hashes=frozenset(r.content_hash for r in records),
    )


def imported(target) -> dict[str, str]:
    return {r.record_id: r.text for r in from_table(read_table(target))}


def test_a_line_inserted_above_a_deleted_record_neither_brings_it_back_nor_excludes_another(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("alpha\nsecret of bob\ngamma\n")
    target = tmp_path / "records.parquet"
    [deleted] = [r for r in read_records(src, TXT) if r.text == "secret of bob"]
    ledger = deleting([deleted])
    import_corpus(src, TXT, target, ledger)
    assert sorted(imported(target).values()) == ["alpha", "gamma"]
    # the user inserts a line above: the deleted text keeps its id, the innocent record at its old position stays
    src.write_text("alpha\ninserted\nsecret of bob\ngamma\n")
    rep = import_corpus(src, TXT, target, ledger)
    assert sorted(imported(target).values()) == ["alpha", "gamma", "inserted"]
    assert (rep.read, rep.excluded, rep.refused, rep.records) == (4, 1, 0, 3)
    # the same text again under another position (a second copy): left out too, by its text
    src.write_text("secret of bob\nalpha\ninserted\nsecret of bob\ngamma\n")
    rep = import_corpus(src, TXT, target, ledger)
    assert sorted(imported(target).values()) == ["alpha", "gamma", "inserted"]
    assert (rep.excluded, rep.refused) == (2, 1)


def test_a_deleted_text_re_added_under_a_new_id_and_owner_is_refused(tmp_path):
    rows = [
        {"id": "a1", "owner": "alice", "text": "alice's address"},
        {"id": "b1", "owner": "bob", "text": "bob's note"},
    ]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp_path / "records.parquet"
    a1 = read_records(src, JSONL)[0]
    ledger = Exclusions(
        owners=frozenset({"alice"}),
        text_hashes=frozenset({text_hash(a1.text)}),
        content_hashes=frozenset({a1.content_hash}),
    )
    with open(src, "a") as fh:
        fh.write(json.dumps({"id": "z9", "owner": "zed", "text": "alice's address"}) + "\n")
    rep = import_corpus(src, JSONL, target, ledger)
    assert imported(target) == {"b1": "bob's note"}
    assert (rep.read, rep.excluded, rep.refused, rep.records) == (3, 2, 1, 1)
    # the report beside the corpus holds counts and no text
    assert "alice" not in import_report_file(target).read_text()
    assert read_import_report(target) == rep


def test_a_request_recorded_before_text_hashes_still_holds_for_the_text(tmp_path):
    """Older ledger entries have content hashes only: a source record that still has one gives its text."""
    src = tmp_path / "c.jsonl"
    rows = [
        {"id": "a1", "owner": "alice", "text": "private"},
        {"id": "z9", "owner": "zed", "text": "private"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp_path / "records.parquet"
    ledger = Exclusions(
        owners=frozenset({"alice"}), content_hashes=frozenset({content_hash("a1", "private")})
    )
    rep = import_corpus(src, JSONL, target, ledger)
    assert imported(target) == {}
    assert rep.refused == 1


def test_a_ledger_written_with_positional_ids_still_leaves_its_records_out(tmp_path):
    """Before ids came from the text, a txt record's id was 'line-N': its request named that id, and its content
    hash covered it. Those ids now match nothing; the content hash still finds the record at its position."""
    src = tmp_path / "c.txt"
    src.write_text("alpha\n\nsecret\ngamma\n")
    target = tmp_path / "records.parquet"
    ledger = Exclusions(
        owners=frozenset({"line-3"}),
        records=frozenset({"line-3"}),
        content_hashes=frozenset({content_hash("line-3", "secret")}),
    )
    rep = import_corpus(src, TXT, target, ledger)
    assert sorted(imported(target).values()) == ["alpha", "gamma"]
    assert rep.excluded == 1
    # the rows of a jsonl corpus without an id field were 'row-N', counted over non-blank lines
    rows = [{"t": "one"}, {"t": "two"}, {"t": "three"}]
    src = tmp_path / "c.jsonl"
    src.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    params = CorpusParams(path="x", id_field=None, owner_field=None, text_field="t", text_template=None)
    assert read_source(src, params).positional_ids == ["row-1", "row-2", "row-3"]
    import_corpus(src, params, target, Exclusions(content_hashes=frozenset({content_hash("row-2", "two")})))
    assert sorted(imported(target).values()) == ["one", "three"]


def test_the_import_is_a_function_of_the_source_and_the_ledger(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("b\na\nb\nc\n")
    ledger = deleting([r for r in read_records(src, TXT) if r.text == "c"])
    a, b = tmp_path / "a" / "records.parquet", tmp_path / "b" / "records.parquet"
    import_corpus(src, TXT, a, ledger)
    import_corpus(src, TXT, b, ledger)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(imported(a)) == sorted([content_id("a"), content_id("b"), content_id("b") + "-2"])


BAD = [
    {"id": "r1", "owner": "o1", "text": "kept one"},
    {"id": "r2", "owner": "o2", "text": "   "},
    "{not json at all, with a secret",
    [1, 2],
    {"id": "r5", "owner": "o5"},
    {"id": "r1", "owner": "o6", "text": "a duplicate id, with a secret"},
    {"id": "r7", "owner": "o7", "text": "kept two"},
]


def write_bad(path):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in BAD))
    return path


def test_an_invalid_record_refuses_the_corpus_by_default_and_says_how_to_skip(tmp_path):
    src = write_bad(tmp_path / "c.jsonl")
    with pytest.raises(CorpusError) as e:
        read_records(src, JSONL)
    assert f"{src}:2: field 'text' is empty" in str(e.value)
    assert "corpus.skip_invalid: true" in str(e.value) and "--skip-invalid" in str(e.value)
    target = tmp_path / "records.parquet"
    with pytest.raises(CorpusError):
        import_corpus(src, JSONL, target, Exclusions())
    assert not target.exists()


def test_skip_invalid_imports_the_valid_records_and_names_the_others_by_file_and_line(tmp_path):
    src = write_bad(tmp_path / "c.jsonl")
    params = CorpusParams(**{**JSONL.__dict__, "skip_invalid": True})
    target = tmp_path / "records.parquet"
    rep = import_corpus(src, params, target, Exclusions())
    assert imported(target) == {"r1": "kept one", "r7": "kept two"}
    assert (rep.read, rep.records) == (2, 2)
    assert rep.skipped == [
        f"{src}:2: field 'text' is empty",
        f"{src}:3: malformed JSON",
        f"{src}:4: not a JSON object",
        f"{src}:5: missing field 'text'",
        f"{src}:6: duplicate record id (first seen at {src}:1)",
    ]
    written = import_report_file(target).read_text()
    assert "secret" not in written and "secret" not in rep.summary()
    assert f"{src}:3: malformed JSON" in rep.summary() and "5 invalid record(s) skipped" in rep.summary()
    # a corpus with nothing valid is still refused
    src.write_text('{"id": "x"}\n')
    with pytest.raises(CorpusError, match="holds no records"):
        import_corpus(src, params, target, Exclusions())
