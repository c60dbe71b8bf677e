"""`sisaflow evaluate` against a forget (issue 25, point 4): it scores without the workspace lock, so a forget
never waits for an evaluation, and writes its reports and commits dvc.lock only under the lock, so the two never
interleave their read-modify-writes; figures of a model the workspace stopped serving meanwhile are not written."""

from __future__ import annotations

import logging
import threading
import time

from sisaflow import cli
from sisaflow.core import ledger, lock


def _evaluate_while_the_lock_is_held(ws, caplog, while_waiting):
    """Hold the workspace lock as a forget does, run `sisaflow evaluate` beside it, and once evaluate waits for
    the lock (its own message says so) call `while_waiting`, then release; evaluate's exit status."""
    rc: list[int] = []
    thread = threading.Thread(
        target=lambda: rc.append(
            cli.main(["--workspace", str(ws.root), "evaluate", "--no-baseline", "--no-dvc"])
        )
    )
    with caplog.at_level(logging.INFO, logger="sisaflow"):
        with lock.workspace_lock(ws, "sisaflow forget"):
            thread.start()
            while not any("waiting for the active sisaflow forget" in r.message for r in caplog.records):
                assert thread.is_alive(), "evaluate ended without waiting for the lock"
                time.sleep(0.05)
            assert not (ws.root / "reports").exists()  # scored, but nothing written while the forget holds it
            while_waiting()
        thread.join()
    return rc[0]


def test_evaluate_writes_only_under_the_lock(make_served, make_records, make_params, caplog):
    """Mutant: write_reports outside `workspace_lock` (as before): reports appear while the forget holds it."""
    params = make_params(
        sharding={"shards": 2, "slices": 2}, evaluate={"rouge_records": 2, "rouge_new_tokens": 2}
    )
    ws = make_served(make_records(owners=4, per_owner=3), params)
    assert _evaluate_while_the_lock_is_held(ws, caplog, lambda: None) == 0
    assert any((ws.root / "reports").iterdir())  # written once the lock was free


def test_a_request_recorded_during_the_evaluation_leaves_nothing_written(
    make_served, make_records, make_params, caplog, capsys
):
    """Mutant: no `served_stamp` comparison under the lock: reports of the model before the deletion are written."""
    params = make_params(
        sharding={"shards": 2, "slices": 2}, evaluate={"rouge_records": 2, "rouge_new_tokens": 2}
    )
    ws = make_served(make_records(owners=4, per_owner=3), params)
    record = lambda: ledger.append_request(ws.ledger_file, ledger.DeletionRequest("req-mid", owners=["o-1"]))  # noqa: E731
    assert _evaluate_while_the_lock_is_held(ws, caplog, record) != 0
    assert "while the ensemble was being evaluated" in capsys.readouterr().err
    assert not (ws.root / "reports").exists()
