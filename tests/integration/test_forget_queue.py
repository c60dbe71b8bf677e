"""Requests that arrive while a forget run is active are queued, and the next run applies them together.

A real `sisaflow forget` (request a) is paused with SIGSTOP once it trains, so it holds the workspace lock for
as long as the test needs. Meanwhile a second full `sisaflow forget` (request b) is started and two more
requests (c, d) are recorded with --no-run. Recording must not wait for the run; b's run must wait and say so.
After the first run resumes, it applies a alone; b's run then applies b, c and d in one pass: one retrain per
touched shard, from the earliest slice any of them touches. Every request ends certified, each state logged
once, and `sisaflow verify --exact` finds the served constituents equal to a training from scratch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from sisaflow.core import ledger, versioning
from sisaflow.core.paths import Workspace
from sisaflow.data.sharding import shard_of, slice_of
from tests.integration.conftest import make_workspace, write_corpus
from tests.integration.procs import run_sisaflow, sisaflow_cmd, sisaflow_env

pytestmark = pytest.mark.integration

SHARDS, SLICES = 2, 4


def _owners(corpus: Path) -> list[str]:
    return sorted({str(json.loads(ln)["author_id"]) for ln in corpus.read_text().splitlines()})


def _pick(owners: list[str]) -> tuple[str, list[str]]:
    """Owner a, placed in slice 0 (its shard retrains every slice: a long run to pause), and b, c, d: two
    of them in one shard at different slices, so batching must start that shard at the earlier one."""
    first = next(o for o in owners if slice_of(o, SLICES) == 0)
    rest = [o for o in owners if o != first]
    for i, x in enumerate(rest):
        for y in rest[i + 1 :]:
            if shard_of(x, SHARDS) == shard_of(y, SHARDS) and slice_of(x, SLICES) != slice_of(y, SLICES):
                third = next(
                    o for o in rest if o not in (x, y) and shard_of(o, SHARDS) != shard_of(x, SHARDS)
                )
                return first, [x, y, third]
    raise AssertionError("the test corpus has no two owners in one shard at different slices")


def _start_forget(ws: Path, owner: str, request_id: str, log: Path) -> subprocess.Popen:
    """A full `sisaflow forget` in its own process group (so it can be paused and killed as a whole)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            sisaflow_cmd(ws, "forget", "--owner", owner, "--request-id", request_id, "--in-process"),
            env=sisaflow_env(log.with_suffix(".prefect")),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _reports(ws: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((ws / "runs").glob("*-forget.json"))]


def test_requests_during_a_run_are_queued_and_batched(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 8)
    ws = make_workspace(tmp_path / "ws", corpus, shards=SHARDS, slices=SLICES)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["epochs_per_slice"] = 2
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    versioning.git_commit(Workspace(ws), "queue test params", ["params.yaml"])
    done = run_sisaflow(sisaflow_cmd(ws, "run", "--in-process"), tmp_path / "prefect-run")
    assert done.returncode == 0, done.stdout + done.stderr

    a, (b, c, d) = _pick(_owners(corpus))
    shard_a = shard_of(a, SHARDS)
    model_dir = Workspace(ws).model_dir(shard_a)
    trained_before = {p: p.stat().st_mtime_ns for p in model_dir.glob("slice-*/meta.json")}

    log_a, log_b = tmp_path / "forget-a.log", tmp_path / "forget-b.log"
    first = _start_forget(ws, a, "req-a", log_a)
    second = None
    try:
        # pause the first run once it has written a retrained checkpoint: it holds the lock from then on
        deadline = time.monotonic() + 240
        while first.poll() is None and time.monotonic() < deadline:
            now = {p: p.stat().st_mtime_ns for p in model_dir.glob("slice-*/meta.json") if p.is_file()}
            if any(trained_before.get(p) != t for p, t in now.items()):
                break
            time.sleep(0.01)
        assert first.poll() is None, f"the first forget ended before it could be paused:\n{log_a.read_text()}"
        os.killpg(first.pid, signal.SIGSTOP)

        second = _start_forget(ws, b, "req-b", log_b)
        for owner, rid in ((c, "req-c"), (d, "req-d")):
            rec = run_sisaflow(
                sisaflow_cmd(ws, "forget", "--owner", owner, "--request-id", rid, "--no-run"),
                tmp_path / f"prefect-{rid}",
                timeout=60,
            )
            assert rec.returncode == 0, rec.stdout + rec.stderr
            assert f"request {rid} recorded" in rec.stdout
        # b's run must be waiting for the lock, and say so, while the first run is paused
        deadline = time.monotonic() + 120
        while (
            "waiting for the active sisaflow forget" not in log_b.read_text() and time.monotonic() < deadline
        ):
            assert second.poll() is None, (
                f"the second forget ended while the first held the lock:\n{log_b.read_text()}"
            )
            time.sleep(0.2)
        assert "waiting for the active sisaflow forget" in log_b.read_text(), log_b.read_text()
        assert second.poll() is None
        state = ledger.current_state(ws / "deletions" / "ledger.jsonl")
        assert state == {"req-a": "excluded", "req-b": "excluded", "req-c": "excluded", "req-d": "excluded"}

        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, log_a.read_text()
        assert second.wait(timeout=300) == 0, log_b.read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    reports = _reports(ws)
    assert len(reports) == 2, [r["run_id"] for r in reports]
    first_report, second_report = reports
    assert first_report["retrained_requests"] == ["req-a"]
    assert {int(s) for s in first_report["trained"]} == {shard_a}
    assert sorted(second_report["retrained_requests"]) == ["req-b", "req-c", "req-d"]
    expected: dict[int, int] = {}
    for owner in (b, c, d):
        s = shard_of(owner, SHARDS)
        expected[s] = min(expected.get(s, SLICES), slice_of(owner, SLICES))
    assert {int(s): v["from_slice"] for s, v in second_report["trained"].items()} == expected

    history = ledger.states(ws / "deletions" / "ledger.jsonl")
    for rid in ("req-a", "req-b", "req-c", "req-d"):
        seq = [x["state"] for x in history[rid]]
        assert seq == ["pending", "excluded", "retrained", "purged", "certified"], (rid, seq)
    # each certificate names its own request's shard and checkpoints, not everything its batch retrained
    for owner, rid in ((a, "req-a"), (b, "req-b"), (c, "req-c"), (d, "req-d")):
        cert = json.loads((ws / "reports" / "certificates" / f"{rid}.json").read_text())
        s, k = shard_of(owner, SHARDS), slice_of(owner, SLICES)
        assert cert["affected"] == [{"shard": s, "from_slice": k, "slices": list(range(k, SLICES))}], rid
        names = [f"shard-{s}/slice-{j}" for j in range(k, SLICES)]
        assert list(cert["retired_checkpoints"]) == names == list(cert["new_checkpoints"]), rid
        assert all(cert["retired_checkpoints"][n] != cert["new_checkpoints"][n] for n in names), rid
        (env,) = cert["training_environments"][f"shard-{s}"]  # one environment trained every slice
        assert env["torch"] == torch.__version__ and env["device"].startswith("cpu "), rid
    assert versioning.status(Workspace(ws)) == {}

    exact = run_sisaflow(sisaflow_cmd(ws, "verify", "--exact"), tmp_path / "prefect-exact", timeout=600)
    assert exact.returncode == 0, exact.stdout + exact.stderr
    verdicts = [ln.split()[2] for ln in exact.stdout.splitlines() if ln.startswith("shard ")]
    assert verdicts and set(verdicts) == {"equal"}, exact.stdout
