"""request_deletion against a workspace: a deletion holds for the records' text (kept as hashes in the ledger,
never the text), and a retry of a request with the same input is the same request in either unlearn.unknown
mode."""

from __future__ import annotations

import json

import pytest
import yaml

from sisaflow.core import ledger
from sisaflow.core.config import Params
from sisaflow.core.errors import DeletionError
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import content_id, from_table, read_table, text_hash
from sisaflow.deletion.requests import request_deletion
from sisaflow.pipeline import steps
from sisaflow.pipeline.status import format_status, workspace_status


def workspace(tmp_path, corpus: dict, unknown: str = "error") -> tuple[Workspace, Params]:
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir(exist_ok=True)
    params = Params.from_dict({"corpus": corpus, "unlearn": {"unknown": unknown}})
    ws.params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    steps.prepare(ws, params)
    return ws, params


def texts(ws: Workspace) -> list[str]:
    return sorted(r.text for r in from_table(read_table(ws.corpus_file)))


TXT = {"path": "c.txt", "format": "txt", "id_field": None, "owner_field": None, "text_template": None}


def test_a_forgotten_line_stays_forgotten_when_lines_move_or_it_is_added_again(tmp_path):
    (tmp_path / "ws").mkdir()
    source = tmp_path / "ws" / "c.txt"
    source.write_text("alpha\nmy phone is 555-0101\ngamma\n")
    ws, params = workspace(tmp_path, TXT)
    secret = content_id("my phone is 555-0101")
    req, new, _ = request_deletion(ws, [], [secret], "req-1")
    assert new and req.records == [secret] and req.text_hashes == [text_hash("my phone is 555-0101")]
    assert "555" not in ws.ledger_file.read_text()
    assert steps.prepare(ws, params).records == 2
    # a line inserted above it, and the same text added again further down
    source.write_text("inserted\nalpha\nmy phone is 555-0101\ngamma\nmy phone is 555-0101\n")
    rep = steps.prepare(ws, params)
    assert texts(ws) == ["alpha", "gamma", "inserted"]
    assert (rep.excluded, rep.refused) == (2, 1)
    st = workspace_status(ws)
    assert st["imported"]["refused"] == 1 and st["imported"]["records"] == 3
    shown = format_status(st)
    assert "1 of them by their text alone" in shown and "555" not in shown + json.dumps(st)


def test_the_same_text_under_another_owner_is_covered_and_refused_when_it_comes_back(tmp_path):
    rows = [
        {"id": "a1", "owner": "alice", "text": "shared sentence"},
        {"id": "a2", "owner": "alice", "text": "alice alone"},
        {"id": "b1", "owner": "bob", "text": "shared sentence"},
        {"id": "b2", "owner": "bob", "text": "bob alone"},
    ]
    (tmp_path / "ws").mkdir()
    source = tmp_path / "ws" / "c.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = {"path": "c.jsonl", "id_field": "id", "owner_field": "owner", "text_field": "text"}
    ws, params = workspace(tmp_path, {**corpus, "text_template": None})
    by_id = {r.record_id: r for r in from_table(read_table(ws.corpus_file))}
    req, _, _ = request_deletion(ws, ["alice"], [])
    # bob's copy of alice's sentence is the same content: covered (so its shard is not served until retrained)
    assert sorted(req.content_hashes) == sorted(by_id[i].content_hash for i in ("a1", "a2", "b1"))
    assert sorted(req.text_hashes) == sorted({text_hash("shared sentence"), text_hash("alice alone")})
    steps.prepare(ws, params)
    assert texts(ws) == ["bob alone"]
    with open(source, "a") as fh:
        fh.write(json.dumps({"id": "c9", "owner": "carol", "text": "alice alone"}) + "\n")
    rep = steps.prepare(ws, params)
    assert texts(ws) == ["bob alone"] and rep.refused == 2


@pytest.mark.parametrize("unknown", ["warn", "error"])
def test_a_retry_with_the_same_input_is_the_same_request(tmp_path, unknown):
    (tmp_path / "ws").mkdir()
    rows = [{"id": f"r{i}", "owner": f"o{i}", "text": f"text {i}"} for i in range(3)]
    (tmp_path / "ws" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = {"path": "c.jsonl", "id_field": "id", "owner_field": "owner", "text_field": "text"}
    ws, _ = workspace(tmp_path, {**corpus, "text_template": None}, unknown)
    named = ["o1", "nobody"] if unknown == "warn" else ["o1", "o2"]
    req, new, warnings = request_deletion(ws, named, [], "req-1")
    assert new and bool(warnings) == (unknown == "warn")
    again, new, warnings = request_deletion(ws, list(reversed(named)), [], "req-1")
    assert (again.request_id, new, warnings) == ("req-1", False, [])
    assert [r.request_id for r in ledger.read_ledger(ws.ledger_file)] == ["req-1"]
    for other in (["o1"], ["o1", "nobody", "o2"], ["o0"]):
        with pytest.raises(DeletionError, match="already used by a different request"):
            request_deletion(ws, other, [], "req-1")
    # the race: two processes pass the check before either appends; the ledger compares the input too
    dup = ledger.DeletionRequest("req-1", ["o1"], [], input_hash=ledger.input_hash(named, []))
    assert ledger.append_request(ws.ledger_file, dup) is False
