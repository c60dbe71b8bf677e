"""places.scan: planted copies of deleted records are found where they are, and nowhere else.

One workspace (git + DVC, a local remote outside it) gets a copy of deleted records in each kind of place scan
must search; the expected findings are compared as a whole set, so a false positive fails as surely as a miss.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sisaflow.core.config import Params
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import Record, content_hash, to_table, write_table
from sisaflow.deletion import leftovers
from sisaflow.scan import places

TEMPLATE = "Question: {question}\nAnswer: {answer}"
SHARED_Q = "What genre is the author known for writing in most often?"
ROWS = [  # id, owner, question, answer; owner o-1 is the one forgotten
    ("rec-0001", "o-1", SHARED_Q, "Ana Lopez writes hard-boiled detective fiction set in Lisbon harbours."),
    (
        "rec-0002",
        "o-1",
        "Where did Ana Lopez grow up before moving to the coast of Portugal?",
        "She grew up in a small mountain village near Braga with four siblings.",
    ),
    ("rec-0010", "o-2", SHARED_Q, "Bo Chen writes science fiction about generation ships and their crews."),
    (
        "rec-0011",
        "o-2",
        "Which award did Bo Chen receive for the novel about the frozen moon?",
        "Bo Chen received the Halcyon Prize for speculative fiction in 2011.",
    ),
    (
        "rec-0020",
        "o-3",
        "How does Carla Dunn describe her daily writing routine to interviewers?",
        "Carla Dunn writes every morning from five until nine, longhand, in green ink.",
    ),
]
DELETED_OWNER = "o-1"


def _records() -> list[Record]:
    out = []
    for rid, owner, q, a in ROWS:
        text = TEMPLATE.format(question=q, answer=a)
        out.append(Record(rid, owner, text, content_hash(rid, text)))
    return out


def _fillers() -> list[Record]:
    """Records around a target in a Parquet file, so that its text is neither a column's min nor its max
    (Parquet statistics keep those in plain bytes) and zstd has something to compress."""
    out = []
    for i in range(30):
        for pre in ("A", "Z"):
            rid = f"fill-{pre}-{i:02d}"
            text = (
                f"{pre} filler question {i} about the weather in the city?\nAnswer: sunny and warm all day."
            )
            out.append(Record(rid, "o-9", text, content_hash(rid, text)))
    return out


def _sh(cwd: Path, *args: str, stdin: bytes | None = None) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@localhost",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@localhost",
        "DVC_NO_ANALYTICS": "1",
    }
    proc = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, env=env, check=True)
    return proc.stdout.decode().strip()


def _base(root: Path, remote: Path) -> tuple[Workspace, Params]:
    """A workspace with params (template corpus), the source inside it, git and DVC with a local remote."""
    dvc = str(Path(sys.executable).parent / "dvc")
    root.mkdir(parents=True)
    raw = Params().to_dict()
    raw["corpus"] = {
        "path": "records.jsonl",
        "format": "jsonl",
        "id_field": "id",
        "owner_field": "owner",
        "text_field": None,
        "text_template": TEMPLATE,
    }
    params = Params.from_dict(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    (root / "records.jsonl").write_text(
        "".join(json.dumps({"id": r, "owner": o, "question": q, "answer": a}) + "\n" for r, o, q, a in ROWS)
    )
    _sh(root, "git", "init", "-q")
    _sh(root, dvc, "init", "-q")
    _sh(root, dvc, "remote", "add", "-d", "storage", str(remote))
    remote.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    kept = [r for r in _records() if r.owner != DELETED_OWNER]
    write_table(ws.corpus_file, to_table(kept))
    write_table(ws.root / "shards" / "shard-0" / "slice-0.parquet", to_table(kept))
    deleted = [r for r in _records() if r.owner == DELETED_OWNER]
    ledger = {
        "request_id": "req-1",
        "owners": [DELETED_OWNER],
        "records": [],
        "content_hashes": sorted(r.content_hash for r in deleted),
    }
    ws.ledger_file.parent.mkdir(parents=True, exist_ok=True)
    ws.ledger_file.write_text(json.dumps(ledger) + "\n")
    _sh(root, "git", "add", "params.yaml", "records.jsonl", "deletions", ".dvc/config")
    _sh(root, "git", "commit", "-q", "-m", "workspace")
    return ws, params


def _targets(ws: Workspace, params: Params) -> list[places.Target]:
    deleted = {r.content_hash for r in _records() if r.owner == DELETED_OWNER}
    return places.targets_from_source(ws, params, deleted, request_id="req-1")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    ws, params = _base(tmp / "ws", tmp / "remote")
    recs = {r.record_id: r for r in _records()}
    r1, r2 = recs["rec-0001"], recs["rec-0002"]
    expected: set[tuple[str, str, str]] = set()  # (where, what, record_id)

    # 1. a plain file holding a deleted text
    (ws.root / "notes").mkdir()
    (ws.root / "notes" / "dump.txt").write_text("log line\n" + r1.text + "\n")
    expected.add(("notes/dump.txt", "text", "rec-0001"))

    # 2. a zstd Parquet file holding a deleted record (its text is not in the file's raw bytes)
    stale = ws.root / "shards" / "shard-0" / "slice-1.parquet"
    write_table(stale, to_table([r2, *_fillers()]))
    expected |= {
        ("shards/shard-0/slice-1.parquet", w, "rec-0002") for w in ("text", "content_hash", "record_id")
    }

    # 3. the same record in another layout (the source's fields as JSON): found by its distinctive answer
    row = next(x for x in ROWS if x[0] == "rec-0002")
    (ws.root / "export.json").write_text(json.dumps({"q": row[2], "a": row[3]}, indent=2))
    expected.add(("export.json", "text", "rec-0002"))

    # 4. a file that was committed, then removed from the tree
    (ws.root / "leak.txt").write_text("copied: " + r2.text)
    _sh(ws.root, "git", "add", "leak.txt")
    _sh(ws.root, "git", "commit", "-q", "-m", "oops")
    leak_commit = _sh(ws.root, "git", "rev-parse", "HEAD")
    _sh(ws.root, "git", "rm", "-q", "leak.txt")
    _sh(ws.root, "git", "commit", "-q", "-m", "remove leak")
    expected.add((f"git:{leak_commit}:leak.txt", "text", "rec-0002"))

    # 5. a git blob that no commit references (still in .git/objects)
    blob = _sh(ws.root, "git", "hash-object", "-w", "--stdin", stdin=f"orphan {r1.content_hash}\n".encode())
    expected.add((f"git:unreachable:{blob}", "content_hash", "rec-0001"))

    # 6. a DVC cache object: an old slice file (zstd Parquet, no extension)
    obj = ws.root / ".dvc" / "cache" / "files" / "md5" / "ab" / ("c" * 30)
    write_table(obj, to_table([r1]))
    expected |= {
        (f"dvc-cache:files/md5/ab/{'c' * 30}", w, "rec-0001") for w in ("text", "content_hash", "record_id")
    }

    # 7. a DVC remote object: an old lineage.json (content hashes)
    robj = tmp / "remote" / "files" / "md5" / "cd" / ("e" * 30)
    robj.parent.mkdir(parents=True)
    robj.write_text(json.dumps(sorted([r1.content_hash, recs["rec-0010"].content_hash]), indent=2))
    expected.add((f"dvc-remote:files/md5/cd/{'e' * 30}", "content_hash", "rec-0001"))

    # 8. a Prefect persisted result: JSON around base64 of a pickle
    storage = ws.prefect_home / "storage"
    storage.mkdir(parents=True)
    payload = base64.encodebytes(pickle.dumps({"rows": [r2.text]})).decode()
    (storage / "f00d").write_text(
        json.dumps({"metadata": {"serializer": {"type": "pickle"}}, "result": payload})
    )
    assert r2.text.encode() not in (storage / "f00d").read_bytes()
    expected.add(("prefect-home:storage/f00d", "text", "rec-0002"))

    # 9. ids that only look alike are not the record's id
    (ws.root / "notes" / "ids.txt").write_text("rec-00012 xrec-0001 rec-0001a\n")

    # excluded places: a certificate (hashes), the ledger (committed), the source (committed), a ledger line
    # git holds but no commit references (staged, then unstaged)
    cert = ws.root / "reports" / "certificates" / "req-1.json"
    cert.parent.mkdir(parents=True)
    cert.write_text(
        json.dumps({"request_id": "req-1", "content_hashes": [r1.content_hash], "ids": ["rec-0001"]})
    )
    line = json.dumps({"request_id": "req-0", "content_hashes": [r2.content_hash], "records": ["rec-0002"]})
    _sh(ws.root, "git", "hash-object", "-w", "--stdin", stdin=(line + "\n").encode())
    # ... but text is never allowed there
    (cert.parent / "bad.json").write_text(json.dumps({"records": [{"id": "rec-0002", "text": r2.text}]}))
    expected.add(("reports/certificates/bad.json", "text", "rec-0002"))

    targets = _targets(ws, params)
    report = places.scan_report(ws, params, targets)
    return {"ws": ws, "params": params, "report": report, "expected": expected, "stale": stale}


def _found(report) -> set[tuple[str, str, str]]:
    return {(f.where, f.what, f.record_id) for f in report.findings}


def test_every_planted_copy_is_found_and_nothing_else(planted):
    assert _found(planted["report"]) == planted["expected"]
    assert all(f.request_id == "req-1" for f in planted["report"].findings)


def test_plain_file(planted):
    assert ("notes/dump.txt", "text", "rec-0001") in _found(planted["report"])


def test_zstd_parquet_is_decoded(planted):
    stale = planted["stale"]
    text = next(r.text for r in _records() if r.record_id == "rec-0002")
    assert stale.read_bytes()[:4] == b"PAR1"
    assert text.encode() not in stale.read_bytes()  # a byte search alone would miss it
    found = {what for w, what, _ in _found(planted["report"]) if w == "shards/shard-0/slice-1.parquet"}
    assert found == {"text", "content_hash", "record_id"}


def test_git_history_of_a_removed_file(planted):
    wheres = {w for w, what, _ in _found(planted["report"]) if w.startswith("git:")}
    assert any(w.endswith(":leak.txt") for w in wheres)
    assert any(w.startswith("git:unreachable:") for w in wheres)
    assert not (planted["ws"].root / "leak.txt").exists()


def test_dvc_cache_remote_and_prefect_home(planted):
    prefixes = {w.split(":", 1)[0] for w, _, _ in _found(planted["report"]) if ":" in w}
    assert {"dvc-cache", "dvc-remote", "prefect-home"} <= prefixes


def test_excluded_places_are_not_reported_but_listed(planted):
    rep = planted["report"]
    for f in rep.findings:
        assert not f.where.startswith(("deletions/", "records.jsonl"))
        assert not f.where.endswith((":deletions/ledger.jsonl", ":records.jsonl"))
        if f.where.startswith("reports/certificates/"):
            assert f.what == "text"  # ids and hashes are allowed there; text is not
    assert any("records.jsonl" in e and "corpus source" in e for e in rep.excluded)
    assert any(e.startswith("deletions/") for e in rep.excluded)
    assert any(e.startswith("reports/certificates/") for e in rep.excluded)


def test_kept_records_sharing_a_question_are_not_reported(planted):
    # corpus/records.parquet and slice-0 hold the kept records, one with the deleted record's question
    wheres = {w for w, _, _ in _found(planted["report"])}
    assert "corpus/records.parquet" not in wheres
    assert "shards/shard-0/slice-0.parquet" not in wheres
    assert "notes/ids.txt" not in wheres


def test_clean_workspace_has_no_findings(tmp_path):
    ws, params = _base(tmp_path / "ws", tmp_path / "remote")
    rep = places.scan_report(ws, params, _targets(ws, params))
    assert rep.findings == [] and rep.clean
    assert rep.files_scanned > 0 and rep.git_objects_scanned > 0
    assert places.scan(ws, params, _targets(ws, params)) == []


def test_targets_from_source_gives_text_and_hash_only_targets(planted):
    ws, params = planted["ws"], planted["params"]
    r1 = next(r for r in _records() if r.record_id == "rec-0001")
    got = places.targets_from_source(ws, params, {r1.content_hash: "req-a", "f" * 64: "req-b"})
    assert got == [
        places.Target("req-a", "rec-0001", r1.content_hash, r1.text),
        places.Target("req-b", "", "f" * 64, None),
    ]
    from_ledger = leftovers.targets_from_ledger(ws, params)
    assert sorted(t.record_id for t in from_ledger) == ["rec-0001", "rec-0002"]
    assert {t.request_id for t in from_ledger} == {"req-1"}


def test_text_pieces_use_template_fields():
    text = TEMPLATE.format(question=SHARED_Q, answer="short")
    assert places.text_pieces(text, TEMPLATE) == [text, SHARED_Q]
    assert places.text_pieces("a\n" + "x" * 50, None) == ["a\n" + "x" * 50, "x" * 50]


def test_finding_and_report_are_json_able(planted):
    f = planted["report"].findings[0]
    assert json.loads(json.dumps(f.to_json()))["where"] == f.where
    d = json.loads(json.dumps(planted["report"].to_json()))
    assert d["clean"] is False and len(d["findings"]) == len(planted["expected"])
    assert d["findings_by_location"] == {
        "dvc-cache": 3,
        "dvc-remote": 1,
        "export.json": 1,
        "git": 2,
        "notes": 1,
        "prefect-home": 1,
        "reports": 1,
        "shards": 3,
    }


def test_the_report_says_what_it_left_out_and_what_the_source_still_holds(planted):
    """A certificate must not read 'clean' for places nobody searched: the report counts them, by kind."""
    rep = planted["report"]
    assert rep.not_searched() == {"corpus-source": 1}
    assert rep.source_holds == 2  # both of the owner's records: their text was searched for
    assert json.loads(json.dumps(rep.to_json()))["not_searched"] == {"corpus-source": 1}


def test_a_remote_that_cannot_be_listed_and_an_erased_source_are_counted(tmp_path, monkeypatch):
    ws, params = _base(tmp_path / "ws", tmp_path / "remote")
    targets = _targets(ws, params)  # made while the source still holds the records
    source = ws.root / "records.jsonl"
    source.write_text("".join(ln + "\n" for ln in source.read_text().splitlines() if DELETED_OWNER not in ln))
    _sh(ws.root, str(Path(sys.executable).parent / "dvc"), "remote", "modify", "storage", "url", "s3://b/x")
    # no credentials anywhere, and no instance metadata service to ask for them: boto fails before connecting
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    rep = places.scan_report(ws, params, targets)
    assert rep.not_searched() == {"corpus-source": 1, "dvc-remote": 1}
    assert rep.source_holds == 0
    # an object store it cannot list (here: no credentials) is named as not searched
    assert any(n.startswith("DVC remote 'storage' (s3://b/x)") and "not searched" in n for n in rep.notes)


def test_a_copy_of_a_retired_checkpoints_weights_is_found(tmp_path):
    """A model trained on deleted records is a copy of them too: the weights files the requests retired (their
    impact records name them) are looked for byte for byte, in the tree, the DVC cache and git history."""
    from sisaflow.core.fsio import write_json
    from sisaflow.deletion.impact import impact_file

    ws, params = _base(tmp_path / "ws", tmp_path / "remote")
    weights = os.urandom(4096)
    write_json(
        impact_file(ws, "req-1"),
        {
            "request_id": "req-1",
            "slices": 2,
            "shards": {
                "0": {
                    "holding": [1],
                    "from_slice": 1,
                    "retired": {"1": hashlib.sha256(weights).hexdigest()},
                    "retired_bytes": {"1": len(weights)},
                }
            },
        },
    )
    (ws.root / "backup").mkdir()
    (ws.root / "backup" / "model.safetensors").write_bytes(weights)
    (ws.root / "backup" / "same-size.bin").write_bytes(os.urandom(4096))  # same size, other bytes
    cached = ws.root / ".dvc" / "cache" / "files" / "md5" / "0f" / ("1" * 30)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights)
    _sh(ws.root, "git", "add", "backup/model.safetensors")
    _sh(ws.root, "git", "commit", "-q", "-m", "a backup")
    blob = _sh(ws.root, "git", "rev-parse", "HEAD:backup/model.safetensors")
    rep = leftovers.scan_report(ws, params, _targets(ws, params))
    found = {(f.where, f.record_id) for f in rep.findings if f.what == "weights"}
    assert found == {
        ("backup/model.safetensors", "shard-0/slice-1"),
        (f"dvc-cache:files/md5/0f/{'1' * 30}", "shard-0/slice-1"),
        (f"git:{blob}:backup/model.safetensors", "shard-0/slice-1"),
    }
    assert all(f.request_id == "req-1" for f in rep.findings if f.what == "weights")


def test_a_copy_of_a_retired_checkpoints_optimizer_state_is_found(tmp_path):
    """AdamW's moments are running sums of the deleted records' gradients: the optimizer state of a retired
    checkpoint is looked for like its weights (the impact record names both), and a copy is named as such."""
    from sisaflow.core.fsio import write_json
    from sisaflow.deletion.impact import impact_file

    ws, params = _base(tmp_path / "ws", tmp_path / "remote")
    weights, optimizer = os.urandom(4096), os.urandom(8192)
    files = {
        "model.safetensors": {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)},
        "optimizer.safetensors": {"sha256": hashlib.sha256(optimizer).hexdigest(), "bytes": len(optimizer)},
    }
    write_json(
        impact_file(ws, "req-1"),
        {
            "request_id": "req-1",
            "slices": 2,
            "shards": {
                "0": {
                    "holding": [1],
                    "from_slice": 1,
                    "retired": {"1": files["model.safetensors"]["sha256"]},
                    "retired_bytes": {"1": len(weights)},
                    "retired_files": {"1": files},
                }
            },
        },
    )
    (ws.root / "backup").mkdir()
    (ws.root / "backup" / "optimizer.safetensors").write_bytes(optimizer)
    (ws.root / "backup" / "same-size.bin").write_bytes(os.urandom(8192))  # same size, other bytes
    cached = ws.root / ".dvc" / "cache" / "files" / "md5" / "ab" / ("2" * 30)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(optimizer)
    _sh(ws.root, "git", "add", "backup/optimizer.safetensors")
    _sh(ws.root, "git", "commit", "-q", "-m", "a backup of the training state")
    blob = _sh(ws.root, "git", "rev-parse", "HEAD:backup/optimizer.safetensors")
    rep = leftovers.scan_report(ws, params, _targets(ws, params))
    found = {(f.where, f.what, f.record_id) for f in rep.findings if f.what in ("weights", "optimizer-state")}
    assert found == {
        ("backup/optimizer.safetensors", "optimizer-state", "shard-0/slice-1"),
        (f"dvc-cache:files/md5/ab/{'2' * 30}", "optimizer-state", "shard-0/slice-1"),
        (f"git:{blob}:backup/optimizer.safetensors", "optimizer-state", "shard-0/slice-1"),
    }
