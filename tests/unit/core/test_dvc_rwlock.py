"""dvc_rwlock: a .dvc/tmp/rwlock that a killed dvc left unreadable is removed before the next dvc command, and
only then: a readable one, or one a live dvc is still editing (its guard held), is left alone."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

from sisaflow.core import dvc_rwlock, versioning
from sisaflow.core.paths import Workspace


def _repo(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws.root, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=ws.root, check=True)
    (ws.root / ".dvc" / "tmp").mkdir(exist_ok=True)
    return ws


def test_a_torn_rwlock_no_longer_stops_dvc(tmp_path):
    ws = _repo(tmp_path)
    rwlock = ws.root / ".dvc" / "tmp" / "rwlock"
    (ws.root / "data.txt").write_text("x")
    rwlock.write_text('{"write": {"data.txt": {"pid": 12')  # cut short, as a SIGKILL mid-write leaves it
    # as DVC itself runs without the repair: every command that takes the rwlock fails
    dvc = str(Path(sys.executable).parent / "dvc")
    assert subprocess.run([dvc, "add", "-q", "data.txt"], cwd=ws.root, capture_output=True).returncode != 0

    versioning.run_tool(ws, "dvc", "add", "-q", "data.txt")  # repaired first, then it works
    assert (ws.root / "data.txt.dvc").is_file()
    assert dvc_rwlock.clear_torn(ws.root / ".dvc") is False  # dvc wrote it whole again


def test_a_readable_rwlock_or_one_being_edited_is_left_alone(tmp_path):
    dvc_dir = tmp_path / ".dvc"
    (dvc_dir / "tmp").mkdir(parents=True)
    rwlock = dvc_dir / "tmp" / "rwlock"
    assert dvc_rwlock.clear_torn(dvc_dir) is False  # none at all

    rwlock.write_text('{"read": {}, "write": {}}')
    assert dvc_rwlock.clear_torn(dvc_dir) is False and rwlock.is_file()

    rwlock.write_text("")
    with open(dvc_dir / "tmp" / "rwlock.lock", "a+b") as guard:  # a live dvc between truncate and write
        fcntl.flock(guard, fcntl.LOCK_EX)
        assert dvc_rwlock.clear_torn(dvc_dir, wait_s=0.2) is False and rwlock.is_file()
    assert dvc_rwlock.clear_torn(dvc_dir) is True and not rwlock.exists()
