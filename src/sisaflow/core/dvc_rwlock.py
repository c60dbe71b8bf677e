"""DVC's record of which outputs its running commands read and write (.dvc/tmp/rwlock), and the repair a crash
needs.

DVC rewrites .dvc/tmp/rwlock in place (truncate, then write the JSON) while it holds an flock on
.dvc/tmp/rwlock.lock. A dvc killed between the two (tests/integration/test_forget_crash.py kills `dvc commit`
inside a forget) leaves it empty or cut short, and every later dvc command then fails ("Unable to read
RWLock-file ... JSON structure is corrupted"; with -q, with no message at all) until someone removes the file
(treeverse/dvc#7615). Holding the same flock, no live dvc process is writing it, so an unreadable file is a dead
writer's, and the entries it held named that writer's locks only.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("sisaflow")


def _readable(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except FileNotFoundError:
        return True
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return True


def clear_torn(dvc_dir: Path, wait_s: float = 10) -> bool:
    """Remove `dvc_dir`/tmp/rwlock when it is not JSON (a dvc process died writing it), holding DVC's own guard
    of that file; True if it was removed. Costs one stat when there is nothing to repair."""
    path = Path(dvc_dir) / "tmp" / "rwlock"
    if not path.is_file() or _readable(path):
        return False
    with open(path.with_name("rwlock.lock"), "a+b") as guard:  # the file zc.lockfile flocks for DVC
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False  # a live dvc holds it: it will fail and say so itself
                time.sleep(0.05)
        try:
            if _readable(path):
                return False
            path.unlink()
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
    log.warning("%s was unreadable (a dvc process was killed while writing it); removed it", path)
    return True
