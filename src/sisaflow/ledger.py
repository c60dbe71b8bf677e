"""The deletion ledger: every request, appended and fsync'd before anything else happens.

deletions/ledger.jsonl holds one JSON object per line: the request id, the owner and record ids it names, the
content hashes of the records it covered, when, and an optional reason. It holds ids and hashes, never text.
It is committed to git, so a fresh clone that re-imports the corpus still leaves these records out.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sisaflow.errors import DeletionError


@dataclass(frozen=True)
class DeletionRequest:
    request_id: str
    owners: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    content_hashes: list[str] = field(default_factory=list)
    requested_at: str = ""
    reason: str | None = None


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
                out.append(DeletionRequest(**json.loads(line)))
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
                existing = DeletionRequest(**json.loads(line))
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
            else DeletionRequest(
                **{**asdict(request), "requested_at": datetime.now(UTC).isoformat(timespec="seconds")}
            )
        )
        fh.write(json.dumps(asdict(stamped), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def excluded(path: Path) -> tuple[set[str], set[str]]:
    """(owners, record ids) that every import must leave out."""
    owners: set[str] = set()
    records: set[str] = set()
    for req in read_ledger(path):
        owners.update(req.owners)
        records.update(req.records)
    return owners, records
