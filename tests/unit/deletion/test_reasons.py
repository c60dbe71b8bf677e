"""Why a record is deleted, without the record (issue 25, point 1): the reason is a code from a fixed list, and
free text goes in a note that is refused when it quotes one of the request's records and is kept out of the
ledger, git and certificates."""

from __future__ import annotations

import json
import stat
import subprocess

import pytest

from sisaflow import cli
from sisaflow.core import ledger
from sisaflow.core.paths import Workspace
from sisaflow.deletion.reasons import REASONS, note_file

DIAGNOSIS = "was diagnosed with a rare form of zqxj syndrome in the spring of 2019"
ROWS = [
    {"id": "maya-note-0001", "author_id": "p0", "text": f"Maya {DIAGNOSIS} and told only her sister."},
    {"id": "maya-note-0002", "author_id": "p0", "text": "Maya keeps bees on the roof of the old mill."},
    {"id": "tomas-note-0001", "author_id": "p1", "text": "Tomas repairs clocks for the town hall."},
    {"id": "tomas-note-0002", "author_id": "p1", "text": "Tomas walks to the lake every morning at six."},
]


@pytest.fixture
def ws(tmp_path) -> Workspace:
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    root = tmp_path / "ws"
    args = ["init", str(root), "--corpus", str(src), "--owner-field", "author_id", "--text-field", "text"]
    assert cli.main([*args, "--shards", "2"]) == 0
    return Workspace(root)


def _forget(ws: Workspace, *args: str) -> int:
    return cli.main(["--workspace", str(ws.root), "forget", "--owner", "p0", "--no-run", *args])


def test_a_free_text_reason_is_refused_with_the_codes(ws, capsys):
    """Mutant: `request_deletion` without `check_reason`: the quoting reason lands in the git-tracked ledger."""
    assert _forget(ws, "--reason", f"please remove my note: I {DIAGNOSIS}") == 1
    err = capsys.readouterr().err
    assert "--reason: a reason code, one of erasure-request, consent-withdrawn" in err and "zqxj" not in err
    assert ledger.read_ledger(ws.ledger_file) == []


@pytest.mark.parametrize(
    "note",
    [
        f"she told us she {DIAGNOSIS}",  # a whole template-free text piece, reworded around it
        "about the rare form of zqxj syndrome she mentioned",  # five words in a row of a record
        "see record maya-note-0002 for details",  # a record id: the deletion scan searches for it
    ],
)
def test_a_note_that_quotes_the_request_s_records_is_refused_and_not_echoed(ws, capsys, note):
    """Mutant: `check_note` searching whole texts only: the second and third notes are recorded."""
    assert _forget(ws, "--reason", "erasure-request", "--note", note) == 1
    err = capsys.readouterr().err
    assert "--note quotes 1 of the request's 2 record(s)" in err and note not in err and "zqxj" not in err
    assert ledger.read_ledger(ws.ledger_file) == [] and not note_file(ws, "x").parent.exists()


def test_a_clean_note_stays_out_of_the_ledger_and_git(ws, capsys):
    """(The certificate carries the code only: test_certificate.test_a_reason_is_carried_as_its_code_only.)"""
    note = "asked by phone on 3 March; identity checked against the signup e-mail"
    assert _forget(ws, "--reason", "consent-withdrawn", "--note", note, "--request-id", "req-n") == 0
    (req,) = ledger.read_ledger(ws.ledger_file)
    assert req.reason == "consent-withdrawn" and req.reason in REASONS
    path = note_file(ws, "req-n")
    assert path.read_text() == note and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ws.root).returncode == 0
    capsys.readouterr()
    assert cli.main(["--workspace", str(ws.root), "requests", "--json"]) == 0
    shown = capsys.readouterr().out + ws.ledger_file.read_text()
    assert "identity checked" not in shown and '"consent-withdrawn"' in shown
