"""The deletion ledger: every request, appended and fsync'd before anything else happens.

deletions/ledger.jsonl holds one JSON object per line: the request id, the owner and record ids it names, the
content hashes of the records it covered, when, and an optional reason. It holds ids and hashes, never text.
It is committed to git, so a fresh clone that re-imports the corpus still leaves these records out.

A request then moves through states, each appended as its own line ({"request_id", "state", "at"}) to
deletions/states.jsonl beside it: pending -> excluded -> retrained -> purged -> certified. Appending (never
rewriting) keeps every step durable and lets two processes write at once under the file lock. The states live
in their own file because the ledger is an input of the DVC prepare stage and a state change is not new data.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sisaflow.core.errors import DeletionError


@dataclass(frozen=True)
class DeletionRequest:
    request_id: str
    owners: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    content_hashes: list[str] = field(default_factory=list)
    requested_at: str = ""
    reason: str | None = None


STATES = ("pending", "excluded", "retrained", "purged", "certified")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _is_state_line(obj: dict) -> bool:
    return "state" in obj and "owners" not in obj


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:12]


def read_ledger(path: Path) -> list[DeletionRequest]:
    """Every request recorded, in order."""
    if not Path(path).is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not _is_state_line(obj):
                    out.append(DeletionRequest(**obj))
            except (json.JSONDecodeError, TypeError) as exc:
                raise DeletionError(f"{path}:{n}: corrupt ledger line ({exc})") from None
    return out


def append_request(path: Path, request: DeletionRequest) -> bool:
    """Append `request` durably; return False (and change nothing) if its id is already recorded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if _is_state_line(obj):
                    continue
                existing = DeletionRequest(**obj)
            except (json.JSONDecodeError, TypeError) as exc:
                raise DeletionError(f"{path}:{n}: corrupt ledger line ({exc})") from None
            if existing.request_id == request.request_id:
                if (sorted(existing.owners), sorted(existing.records)) != (
                    sorted(request.owners),
                    sorted(request.records),
                ):
                    raise DeletionError(
                        f"request id {request.request_id!r} is already used by a different request"
                    )
                return False
        stamped = (
            request
            if request.requested_at
            else DeletionRequest(**{**asdict(request), "requested_at": _now()})
        )
        fh.write(json.dumps(asdict(stamped), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _append_states(path, [request.request_id], "pending", stamped.requested_at)
    return True


def excluded(path: Path) -> tuple[set[str], set[str]]:
    """(owners, record ids) that every import must leave out."""
    owners: set[str] = set()
    records: set[str] = set()
    for req in read_ledger(path):
        owners.update(req.owners)
        records.update(req.records)
    return owners, records


def states_path(ledger_path: Path) -> Path:
    """The state log beside a ledger."""
    return Path(ledger_path).with_name("states.jsonl")


def _append_states(ledger_path: Path, request_ids: list[str], state: str, at: str | None = None) -> list[str]:
    path = states_path(ledger_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    moved: list[str] = []
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        reached: dict[str, int] = {}
        for line in fh:
            if line.strip():
                obj = json.loads(line)
                rank = STATES.index(obj["state"])
                reached[obj["request_id"]] = max(reached.get(obj["request_id"], -1), rank)
        at = at or _now()
        for rid in request_ids:
            if reached.get(rid, -1) < STATES.index(state):
                fh.write(json.dumps({"request_id": rid, "state": state, "at": at}) + "\n")
                moved.append(rid)
        fh.flush()
        os.fsync(fh.fileno())
    return moved


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
    log = states_path(path)
    if not log.is_file():
        return out
    with open(log, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                obj = json.loads(line)
                out.setdefault(obj["request_id"], []).append({"state": obj["state"], "at": obj["at"]})
    return out


def current_state(path: Path) -> dict[str, str]:
    """{request_id: the furthest state reached}."""
    return {rid: max((s["state"] for s in seq), key=STATES.index) for rid, seq in states(path).items()}
