"""ledger: an append-only, idempotent record of deletion requests; ids and hashes only."""

from __future__ import annotations

import json

import pytest

from sisaflow.core.errors import DeletionError
from sisaflow.core.ledger import DeletionRequest, append_request, excluded, new_request_id, read_ledger


def req(rid="req-1", owners=("alice",), records=(), **kw) -> DeletionRequest:
    return DeletionRequest(rid, list(owners), list(records), **kw)


def test_missing_ledger_is_empty(tmp_path):
    assert read_ledger(tmp_path / "ledger.jsonl") == []
    assert excluded(tmp_path / "ledger.jsonl") == (set(), set())


def test_append_writes_one_sorted_json_line_and_stamps_time(tmp_path):
    path = tmp_path / "deletions" / "ledger.jsonl"
    assert append_request(path, req(content_hashes=["h1"], reason="gdpr")) is True
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    state_lines = (path.parent / "states.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in state_lines] == [
        {"request_id": "req-1", "state": "pending", "at": obj["requested_at"]}
    ]
    assert list(obj) == sorted(obj)
    assert obj["request_id"] == "req-1" and obj["owners"] == ["alice"] and obj["records"] == []
    assert obj["content_hashes"] == ["h1"] and obj["reason"] == "gdpr"
    assert obj["requested_at"].startswith("20") and "T" in obj["requested_at"]
    [back] = read_ledger(path)
    assert back.request_id == "req-1" and back.requested_at == obj["requested_at"]


def test_given_timestamp_is_kept(tmp_path):
    path = tmp_path / "ledger.jsonl"
    append_request(path, req(requested_at="2024-01-01T00:00:00+00:00"))
    assert read_ledger(path)[0].requested_at == "2024-01-01T00:00:00+00:00"


def test_append_is_idempotent_on_request_id(tmp_path):
    path = tmp_path / "ledger.jsonl"
    assert append_request(path, req("req-1", owners=["a", "b"])) is True
    before = path.read_bytes()
    # same id, same contents (in another order, other reason): recorded once
    assert append_request(path, req("req-1", owners=["b", "a"], reason="again")) is False
    assert path.read_bytes() == before
    assert [r.request_id for r in read_ledger(path)] == ["req-1"]


def test_same_id_with_different_contents_is_refused(tmp_path):
    path = tmp_path / "ledger.jsonl"
    append_request(path, req("req-1", owners=["a"]))
    before = path.read_bytes()
    with pytest.raises(DeletionError, match="req-1"):
        append_request(path, req("req-1", owners=["b"]))
    with pytest.raises(DeletionError, match="req-1"):
        append_request(path, req("req-1", owners=["a"], records=["r9"]))
    assert path.read_bytes() == before


def test_requests_are_kept_in_order_and_excluded_aggregates(tmp_path):
    path = tmp_path / "ledger.jsonl"
    append_request(path, req("req-1", owners=["alice"], records=[]))
    append_request(path, req("req-2", owners=[], records=["r1", "r2"]))
    append_request(path, req("req-3", owners=["bob", "alice"], records=["r2", "r3"]))
    assert [r.request_id for r in read_ledger(path)] == ["req-1", "req-2", "req-3"]
    owners, records = excluded(path)
    assert owners == {"alice", "bob"}
    assert records == {"r1", "r2", "r3"}


def test_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "ledger.jsonl"
    append_request(path, req("req-1"))
    with open(path, "a") as fh:
        fh.write("\n\n")
    append_request(path, req("req-2", owners=["zed"]))
    assert [r.request_id for r in read_ledger(path)] == ["req-1", "req-2"]


def test_corrupt_line_names_the_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    append_request(path, req("req-1"))
    with open(path, "a") as fh:
        fh.write('{"request_id": "req-2", "owners": [\n')
    with pytest.raises(DeletionError) as e:
        read_ledger(path)
    assert f"{path}:2" in str(e.value)
    path.write_text('{"request_id": "x", "unexpected": 1}\n')
    with pytest.raises(DeletionError, match=":1"):
        read_ledger(path)


def test_new_request_ids_are_unique():
    ids = {new_request_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith("req-") and len(i) == 16 for i in ids)


def test_corrupt_ledger_line_is_named_on_append(tmp_path):
    from sisaflow.core.errors import DeletionError
    from sisaflow.core.ledger import DeletionRequest, append_request

    path = tmp_path / "ledger.jsonl"
    path.write_text('{"request_id": "a", "owners": ["1"]}\n{not json\n')
    with pytest.raises(DeletionError, match=r"ledger.jsonl:2: corrupt ledger line"):
        append_request(path, DeletionRequest(request_id="b", owners=["2"]))


def test_states_move_forward_only_and_keep_their_times(tmp_path):
    from sisaflow.core.ledger import current_state, mark, states

    path = tmp_path / "ledger.jsonl"
    append_request(path, req("a"))
    append_request(path, req("b", owners=["bob"]))
    assert current_state(path) == {"a": "pending", "b": "pending"}
    assert mark(path, ["a"], "excluded") == ["a"]
    assert mark(path, ["a", "b"], "retrained") == ["a", "b"]
    assert mark(path, ["a"], "excluded") == []  # never backwards
    assert mark(path, ["a"], "retrained") == []  # nor twice
    assert current_state(path) == {"a": "retrained", "b": "retrained"}
    seq = states(path)["a"]
    assert [s["state"] for s in seq] == ["pending", "excluded", "retrained"]
    assert all(s["at"].startswith("20") for s in seq)
    assert [r.request_id for r in read_ledger(path)] == ["a", "b"]  # state lines are not requests
    with pytest.raises(ValueError, match="unknown state"):
        mark(path, ["a"], "done")


def test_two_processes_append_at_once(tmp_path):
    import multiprocessing

    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), p)) for p in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = [r.request_id for r in read_ledger(path)]
    assert sorted(ids) == sorted(f"p{p}-{i}" for p in range(2) for i in range(50))
    for line in path.read_text().splitlines():
        json.loads(line)  # no torn line


def _append_many(path, p):
    from sisaflow.core.ledger import DeletionRequest, append_request

    for i in range(50):
        append_request(path, DeletionRequest(request_id=f"p{p}-{i}", owners=[f"o{i}"]))


def test_importing_refuses_a_ledger_that_lost_a_certified_request(tmp_path):
    """A rolled-back ledger (git checkout of deletions/) would import the erased records again; the certificates,
    which git does not track, show it."""
    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace
    from sisaflow.deletion.certificate import build_certificate, write_certificate
    from sisaflow.pipeline import steps
    from tests.unit.deletion.test_certificate import inputs

    ws = Workspace(tmp_path)
    (tmp_path / "records.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "owner": f"o{i}", "text": f"text {i}"}) + "\n" for i in range(3))
    )
    params = Params.from_dict(
        {
            "corpus": {
                "path": "records.jsonl",
                "id_field": "id",
                "owner_field": "owner",
                "text_field": "text",
                "text_template": None,
            }
        }
    )
    append_request(ws.ledger_file, req("req-kept", owners=["o1"]))
    certs = tmp_path / "reports" / "certificates"
    certs.mkdir(parents=True)
    write_certificate(
        certs, build_certificate(**inputs(request={**inputs()["request"], "request_id": "req-kept"}))
    )
    (certs / "notes.json").write_text("{}")  # not a certificate: ignored
    assert steps.prepare(ws, params)["records"] == 2
    write_certificate(
        certs, build_certificate(**inputs(request={**inputs()["request"], "request_id": "req-lost"}))
    )
    with pytest.raises(DeletionError, match=r"lacks 1 certified request\(s\) \(req-lost\)"):
        steps.prepare(ws, params)
