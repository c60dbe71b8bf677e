"""The scan reports its progress in bytes as it goes, and `sisaflow verify` draws it as a bar with the time left,
on a terminal only (never into a log or a test's captured output)."""

from __future__ import annotations

import io
import time

from sisaflow import cli
from sisaflow.scan import places
from sisaflow.scan.progress import terminal_bar
from tests.unit.scan.test_places import _base, _records, _targets


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_scan_calls_progress_with_growing_byte_counts(tmp_path):
    ws, params = _base(tmp_path / "ws", tmp_path / "remote")
    (ws.root / "notes.txt").write_text("x" * 10_000 + next(r.text for r in _records()))
    calls: list[tuple[int, int]] = []
    rep = places.scan_report(ws, params, _targets(ws, params), progress=lambda d, t: calls.append((d, t)))
    # once with the total, then after every file and git object
    assert len(calls) == 1 + rep.files_scanned + rep.git_objects_scanned
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[0] == 0 and done[1] > 0
    total = calls[0][1]
    assert all(t == total for _, t in calls)  # everything was listed before the first search
    assert done[-1] == total >= rep.bytes_scanned > 10_000


def test_the_bar_is_drawn_on_a_terminal_only():
    with terminal_bar("scan", stream=io.StringIO()) as progress:
        assert progress is None
    tty = _Terminal()
    with terminal_bar("scan", stream=tty) as progress:
        assert progress is not None
        for done in range(0, 10_001, 2_500):
            time.sleep(0.15)  # tqdm redraws at most every 0.1 s
            progress(done, 10_000)
        drawn = tty.getvalue()
    assert "scan" in drawn and "75%" in drawn and "<" in drawn  # tqdm's [elapsed<left, rate]


def test_verify_draws_the_bar_on_a_terminal_and_nowhere_else(tmp_path, monkeypatch, capsys):
    ws, _ = _base(tmp_path / "ws", tmp_path / "remote")
    assert cli.main(["--workspace", str(ws.root), "verify"]) == 0
    out, err = capsys.readouterr()
    assert "clean: no copy" in out and "%" not in err  # captured stderr is not a terminal: no bar

    tty = _Terminal()
    monkeypatch.setattr("sys.stderr", tty)
    assert cli.main(["--workspace", str(ws.root), "verify"]) == 0
    drawn = tty.getvalue()
    assert "scan:" in drawn and "%|" in drawn and "<" in drawn  # a bar, with the time left


def test_no_bar_with_sisaflow_progress_0(monkeypatch):
    monkeypatch.setenv("SISAFLOW_PROGRESS", "0")
    with terminal_bar("scan", stream=_Terminal()) as progress:
        assert progress is None
