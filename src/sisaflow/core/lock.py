"""One run, forget or purge at a time per workspace: an flock on a file in the workspace's state directory."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from sisaflow.core.paths import Workspace

log = logging.getLogger("sisaflow")


@contextlib.contextmanager
def workspace_lock(
    ws: Workspace, what: str = "run", waiting: Callable[[str], None] | None = None
) -> Iterator[None]:
    """One run, forget or purge at a time per workspace; a second one waits, and says so through `waiting`.

    The holder writes who it is into the lock file, so the one that waits can name it. Deletion requests do
    not take this lock (the ledger has its own): a request that arrives during a run is recorded at once and
    queued; the next run applies every pending request together.
    """
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    # "a+": opening must not truncate the holder's note
    with open(ws.lock_file, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            message = (
                f"{ws.root}: waiting for the active {holder} to finish (one run at a time per workspace)"
            )
            log.info(message)
            if waiting is not None:
                waiting(message)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{what} (pid {os.getpid()}, since {datetime.now(UTC).isoformat(timespec='seconds')})")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
