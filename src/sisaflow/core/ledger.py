"""The deletion ledger: every request, appended and fsync'd before anything else happens.

deletions/ledger.jsonl holds one JSON object per line: the request id, the owner and record ids it names, the
content hashes of the records it covered and the hashes of their texts alone, a hash of what the request named
as given, when, and an optional reason. It holds ids and hashes, never text. It is committed to git, so a fresh
clone that re-imports the corpus still leaves these records out.

A request then moves through states, each appended as its own line ({"request_id", "state", "at"}) to
deletions/states.jsonl beside it: pending -> excluded -> retrained -> purged -> certified. Appending (never
rewriting) keeps every step durable and lets two processes write at once under the file lock. The states live
in their own file because the ledger is an input of the DVC prepare stage and a state change is not new data.

A crash during an append can leave a torn last line (no newline, not JSON): it was never acknowledged, so
reading ignores it, and the next write, under the lock, moves it aside to `<file>.torn-<UTC time>` beside the
file and cuts it off, with a warning naming that file. A corrupt line before the last stops every reader with a
DeletionError naming the file and line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sisaflow.core import faults
from sisaflow.core.errors import DeletionError
from sisaflow.core.fsio import digest

log = logging.getLogger("sisaflow")


@dataclass(frozen=True)
class DeletionRequest:
    request_id: str
    owners: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    content_hashes: list[str] = field(default_factory=list)
    requested_at: str = ""
    reason: str | None = None
    text_hashes: list[str] = field(default_factory=list)
    """Hashes of the covered records' texts alone: an import leaves out any record with one of these texts,
    whatever its id or owner (empty in requests recorded before they were kept)."""
    input_hash: str = ""
    """A hash of the owners and records the request named as given, before unknown names were dropped
    (unlearn.unknown: warn): a retry with the same input is the same request. Empty in older requests."""
    hash_key: str | None = None
    """The id of the workspace hash key `content_hashes` and `text_hashes` were keyed with (core.hashing); None:
    plain sha256."""

    def same_input(self, owners: Iterable[str], records: Iterable[str]) -> bool:
        """Whether a request naming `owners` and `records` is this one again (a retry)."""
        if self.input_hash:
            return self.input_hash == input_hash(owners, records)
        return (sorted(set(self.owners)), sorted(set(self.records))) == (
            sorted(set(owners)),
            sorted(set(records)),
        )


def require_hash_key(requests: Iterable[DeletionRequest], key_id: str | None) -> None:
    """A DeletionError when a request's hashes were keyed otherwise than the workspace hashes now (`key_id`, its
    corpus.hash_key; None: plain sha256): its records would silently stop matching their content hashes, and
    a record that came back under another id or owner would be imported again."""
    other = [r for r in requests if r.hash_key != key_id]
    if other:
        named = ", ".join(f"{r.request_id} ({r.hash_key or 'plain sha256'})" for r in other[:5])
        raise DeletionError(
            f"{len(other)} deletion request(s) hold record hashes keyed otherwise than this workspace's "
            f"corpus.hash_key ({key_id or 'none: plain sha256'}): {named}. Their records would no longer be "
            "excluded by content; restore the key they were recorded under (params.yaml corpus.hash_key and "
            ".sisaflow/keys/hash-key) before importing again"
        )


STATES = ("pending", "excluded", "retrained", "purged", "certified")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _is_state_line(obj: dict) -> bool:
    return "state" in obj and "owners" not in obj


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:12]


def input_hash(owners: Iterable[str], records: Iterable[str]) -> str:
    """A hash of what a request names, as given: the same owners and records in any order or repetition."""
    return digest(
        ("sisaflow-request-v1", json.dumps([sorted(set(map(str, owners))), sorted(set(map(str, records)))]))
    )


def _parse_lines(path: Path, data: bytes, kind: str) -> list[tuple[int, dict]]:
    """(line number, object) of every complete line of a ledger file's bytes. A last line without its newline
    is kept if it is a whole JSON object and ignored if not (torn: never acknowledged); any other line that is
    not a JSON object is a DeletionError naming the file and line."""
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise DeletionError(f"{path}:{n}: corrupt {kind} line ({exc})") from None
        if not isinstance(obj, dict):
            raise DeletionError(f"{path}:{n}: corrupt {kind} line (not a JSON object)")
        out.append((n, obj))
    if tail.strip():
        try:
            obj = json.loads(tail)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            out.append((len(lines) + 1, obj))
    return out


def _read_lines(path: Path, kind: str) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        return []
    return _parse_lines(path, path.read_bytes(), kind)


def _aside_name(path: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.torn-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.torn-{stamp}-{n}")
    return aside


def _repair_locked(fh, path: Path, kind: str) -> list[tuple[int, dict]]:
    """Under the file's lock (`fh` open "a+b"): end a complete last line that lacks its newline, or move a torn
    last line aside to a dated file beside `path`, cut it off and warn; then the file's lines."""
    fh.seek(0)
    data = fh.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:
            whole = False
        if whole or not tail.strip():
            fh.write(b"\n")  # a whole object (or blanks) that lacked only its newline
            data += b"\n"
        else:
            aside = _aside_name(path)
            with open(aside, "xb") as out:
                out.write(tail)
                out.flush()
                os.fsync(out.fileno())
            os.ftruncate(fh.fileno(), cut)
            data = data[:cut]
            log.warning(
                "%s ended in a torn line (a write cut short, never acknowledged); moved it "
                "aside to %s and removed it from the %s",
                path,
                aside,
                kind,
            )
        fh.flush()
        os.fsync(fh.fileno())
    return _parse_lines(path, data, kind)


def _request(path: Path, n: int, obj: dict) -> DeletionRequest:
    try:
        return DeletionRequest(**obj)
    except TypeError as exc:
        raise DeletionError(f"{path}:{n}: corrupt ledger line ({exc})") from None


def read_ledger(path: Path) -> list[DeletionRequest]:
    """Every request recorded, in order (a torn last line, never acknowledged, is not one)."""
    return [_request(path, n, obj) for n, obj in _read_lines(path, "ledger") if not _is_state_line(obj)]


def append_request(path: Path, request: DeletionRequest) -> bool:
    """Append `request` durably; return False (and change nothing) if its id is already recorded with the same
    input (`DeletionRequest.same_input`), raise DeletionError if it is recorded with another."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        lines = _repair_locked(fh, path, "ledger")
        for n, obj in lines:
            if _is_state_line(obj):
                continue
            existing = _request(path, n, obj)
            if existing.request_id == request.request_id:
                same = (
                    existing.input_hash == request.input_hash
                    if existing.input_hash and request.input_hash
                    else existing.same_input(request.owners, request.records)
                )
                if not same:
                    raise DeletionError(
                        f"request id {request.request_id!r} is already used by a different request"
                    )
                return False
        stamped = (
            request
            if request.requested_at
            else DeletionRequest(**{**asdict(request), "requested_at": _now()})
        )
        line = json.dumps(asdict(stamped), sort_keys=True) + "\n"
        faults.append(fh, line.encode("utf-8"), "ledger-append")  # a plain write unless a test arms it
        fh.flush()
        os.fsync(fh.fileno())
    _append_states(path, [request.request_id], "pending", stamped.requested_at)
    return True


def selected(path: Path, request_ids: list[str] | None = None) -> list[DeletionRequest]:
    """The requests `request_ids` (default: every one recorded), in ledger order."""
    reqs = read_ledger(path)
    return reqs if request_ids is None else [r for r in reqs if r.request_id in set(request_ids)]


def excluded(path: Path, request_ids: list[str] | None = None) -> tuple[set[str], set[str]]:
    """(owners, record ids) that every import must leave out (of the requests `request_ids`, default all)."""
    reqs = selected(path, request_ids)
    return {o for r in reqs for o in r.owners}, {i for r in reqs for i in r.records}


def prefix_of(path: Path, request_ids: list[str]) -> tuple[bytes, list[str]]:
    """(the ledger's bytes as they were when it held only `request_ids`, the ids recorded after them). The ledger
    is append-only, so that is its beginning, up to the first request not in `request_ids`."""
    known = set(request_ids)
    raw = Path(path).read_bytes() if Path(path).is_file() else b""
    end: int | None = None
    later: list[str] = []
    offset = 0
    for line in raw.splitlines(keepends=True):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None  # a torn last line: never acknowledged, not a request
        if isinstance(obj, dict) and "request_id" in obj and not _is_state_line(obj):
            if obj["request_id"] not in known:
                end = offset if end is None else end
                later.append(obj["request_id"])
        offset += len(line)
    return (raw if end is None else raw[:end]), later


def states_path(ledger_path: Path) -> Path:
    """The state log beside a ledger."""
    return Path(ledger_path).with_name("states.jsonl")


def _append_states(ledger_path: Path, request_ids: list[str], state: str, at: str | None = None) -> list[str]:
    path = states_path(ledger_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    moved: list[str] = []
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        lines = _repair_locked(fh, path, "state log")
        reached: dict[str, int] = {}
        for n, obj in lines:
            rid, rank = _state_entry(path, n, obj)
            reached[rid] = max(reached.get(rid, -1), rank)
        at = at or _now()
        for rid in request_ids:
            if reached.get(rid, -1) < STATES.index(state):
                line = json.dumps({"request_id": rid, "state": state, "at": at}) + "\n"
                faults.append(fh, line.encode("utf-8"), f"state-append:{state}")
                moved.append(rid)
        fh.flush()
        os.fsync(fh.fileno())
    return moved


def _state_entry(path: Path, n: int, obj: dict) -> tuple[str, int]:
    """(request id, rank of its state) of a state line; DeletionError naming the line if it is not one."""
    if not isinstance(obj.get("request_id"), str) or obj.get("state") not in STATES or "at" not in obj:
        raise DeletionError(f"{path}:{n}: corrupt state log line (expected request_id, a state and at)")
    return obj["request_id"], STATES.index(obj["state"])


def mark(path: Path, request_ids: list[str], state: str) -> list[str]:
    """Append `state` for each request not yet in it (or a later state); return the ids that moved.

    `path` is the ledger; the states go to the state log beside it."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; states are {', '.join(STATES)}")
    if not request_ids:
        return []
    return _append_states(Path(path), request_ids, state)


def states(path: Path) -> dict[str, list[dict[str, str]]]:
    """{request_id: [{"state", "at"}, ...]} in the order they were reached."""
    out: dict[str, list[dict[str, str]]] = {}
    log_file = states_path(path)
    for n, obj in _read_lines(log_file, "state log"):
        rid, _ = _state_entry(log_file, n, obj)
        out.setdefault(rid, []).append({"state": obj["state"], "at": obj["at"]})
    return out


def current_state(path: Path) -> dict[str, str]:
    """{request_id: the furthest state reached}."""
    return {rid: max((s["state"] for s in seq), key=STATES.index) for rid, seq in states(path).items()}
