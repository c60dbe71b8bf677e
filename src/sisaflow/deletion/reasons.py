"""Why a record is deleted, said without the record: a reason code from a fixed list, and an optional note.

The code is what the ledger (committed to git), `sisaflow requests --json` and a certificate carry. Free text
there was a leak: a reason that quoted the record ("please remove my note about my diagnosis ...") put the
deleted text into git history, where the deletion scan then found it for good and the request could never be
certified. The note is for the operator's own file: before it is written it is searched for the request's own
records, with the deletion scan's patterns (whole texts, distinctive pieces, record ids) and for any run of
NOTE_WORDS words a record shares with it, and refused if it holds one; it is kept in `.sisaflow/notes/` (mode
0600, which git ignores and no DVC output covers) and never enters the ledger, git or a certificate.

The codes follow the grounds of GDPR Art. 17(1) (a right-to-erasure request names one), with the other common
reasons for taking data out of a model beside them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from sisaflow.core.errors import DeletionError
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import Record

REASONS: dict[str, str] = {
    "erasure-request": "the person asked for their data to be erased (GDPR Art. 17)",
    "consent-withdrawn": "consent to the processing was withdrawn (Art. 17(1)(b))",
    "no-longer-needed": "the data is no longer needed for its purpose (Art. 17(1)(a))",
    "objection": "the person objected to the processing (Art. 17(1)(c), Art. 21)",
    "unlawful-processing": "the data was processed unlawfully (Art. 17(1)(d))",
    "legal-obligation": "a legal obligation requires the erasure (Art. 17(1)(e))",
    "child-data": "data collected from a child for an online service (Art. 17(1)(f))",
    "copyright": "a rights holder's takedown request",
    "data-quality": "the data is wrong or harmful and the operator removes it",
    "test": "a test, drill or demonstration",
    "other": "none of the above (say more in the note)",
}
NOTE_WORDS = 5
"""A note sharing this many consecutive words with one of the request's records quotes it."""
MAX_NOTE_CHARS = 2000


def check_reason(code: str | None) -> str | None:
    """`code` if it is one of REASONS (or None), else a DeletionError listing them."""
    if code is None or code in REASONS:
        return code
    raise DeletionError(
        "--reason: a reason code, one of "
        + ", ".join(REASONS)
        + " (free text goes in --note, which is checked "
        "against the request's records and kept out of the ledger, git and certificates)"
    )


def note_file(ws: Workspace, request_id: str) -> Path:
    return ws.state_dir / "notes" / f"{request_id}.txt"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _shares_a_run_of_words(note: str, text: str) -> bool:
    words = _words(text)
    if len(words) < NOTE_WORDS:
        joined = " ".join(words)
        return bool(joined) and f" {joined} " in f" {' '.join(_words(note))} "
    runs = {tuple(words[i : i + NOTE_WORDS]) for i in range(len(words) - NOTE_WORDS + 1)}
    said = _words(note)
    return any(tuple(said[i : i + NOTE_WORDS]) in runs for i in range(len(said) - NOTE_WORDS + 1))


def check_note(note: str, records: Sequence[Record], template: str | None) -> None:
    """A DeletionError, saying how many records it quotes but never what, when `note` holds a piece of one of
    `records` (the request's own) that the deletion scan would find, or a run of NOTE_WORDS of its words."""
    from sisaflow.scan.targets import Target, build_needles

    if len(note) > MAX_NOTE_CHARS:
        raise DeletionError(f"--note: at most {MAX_NOTE_CHARS} characters (it has {len(note)})")
    targets = [Target("note-check", r.record_id, r.content_hash, r.text) for r in records]
    found = {i for i, _ in build_needles(targets, template, None).search(note.encode("utf-8"))}
    found |= {i for i, r in enumerate(records) if _shares_a_run_of_words(note, r.text)}
    if found:
        raise DeletionError(
            f"--note quotes {len(found)} of the request's {len(records)} record(s) (a record id, a piece the "
            f"deletion scan searches for, or {NOTE_WORDS} words in a row): a note must not hold what is being "
            "deleted; nothing was recorded. Describe the request without quoting it"
        )


def write_note(ws: Workspace, request_id: str, note: str) -> Path:
    """The note in .sisaflow/notes/<request>.txt, mode 0600 from the start."""
    path = note_file(ws, request_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(note)
    return path
