"""Deletion requests end to end against a real Prefect server and a process worker.

A tiny workspace is trained (ephemeral Prefect, no server). Then a throwaway Prefect server (own PREFECT_HOME,
free loopback port) gets the workspace's own prefect.yaml deployed and a process worker started in the
workspace. `sisaflow forget` with PREFECT_API_URL set must only record the request and emit the event; the
forget deployment's automation then runs the forget flow on the worker until the request is certified.
Then the drain path: with server and worker stopped, a request is recorded with --no-run; after a restart on
the same PREFECT_HOME the drain deployment (run explicitly instead of waiting for its 15-minute schedule)
applies it. Everything started here is stopped by its process group, never by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import make_workspace, write_corpus
from tests.integration.procs import (
    clean_env,
    executable_beside,
    free_port,
    start_logged,
    stop_group,
    tail,
    wait_healthy,
)
from tests.integration.test_prefect_deploy import STARTUP_TIMEOUT_S, Server, start_server

pytestmark = pytest.mark.integration

AUTHORS = 6
# the workspace is tmp_path/"ws": `sisaflow init` names its deployments and pool after it
FORGET = "sisaflow-forget/ws-forget"
DRAIN = "sisaflow-drain/ws-drain-deletions"
POOL = "sisaflow-ws"
CERTIFIED_TIMEOUT_S = 600
"""A guard against a hang (the worker never picking the run up), not a measure: the times are printed."""


def _healthy_after(proc: subprocess.Popen, server: Server) -> float:
    return wait_healthy(proc, f"{server.api_url}/health", server.log, STARTUP_TIMEOUT_S)


def _start_worker(server: Server, ws: Path, log: Path) -> subprocess.Popen:
    env = {**server.env, "SISAFLOW_WORKSPACE": str(ws), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    return start_logged([server.prefect, "worker", "start", "--pool", POOL], log.parent, env, log)


def _states(ws: Path) -> dict[str, list[str]]:
    from sisaflow.core import ledger

    return {
        rid: [s["state"] for s in seq]
        for rid, seq in ledger.states(ws / "deletions" / "ledger.jsonl").items()
    }


def _wait_certified(ws: Path, request_id: str, watch: list[tuple[subprocess.Popen, Path]]) -> float:
    t0 = time.monotonic()
    while True:
        seq = _states(ws).get(request_id, [])
        if "certified" in seq:
            return time.monotonic() - t0
        for proc, log in watch:
            if proc.poll() is not None:
                pytest.fail(f"{log.name}: exited with {proc.returncode} while waiting:\n{tail(log)}")
        if time.monotonic() - t0 > CERTIFIED_TIMEOUT_S:
            logs = "\n".join(f"--- {log.name}\n{tail(log)}" for _, log in watch)
            pytest.fail(f"{request_id} not certified after {CERTIFIED_TIMEOUT_S}s (states {seq}):\n{logs}")
        time.sleep(1)


def _final_runs(server: Server, deployment: str, request_id: str | None, timeout_s: float = 60) -> list:
    """The deployment's flow runs (those for `request_id` if given), once all of them are in a final state."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    dep = server.api(lambda c: c.read_deployment_by_name(deployment))
    flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]))
    deadline = time.monotonic() + timeout_s
    while True:
        runs = server.api(lambda c: c.read_flow_runs(flow_run_filter=flt))
        if request_id is not None:
            runs = [r for r in runs if r.parameters.get("request_id") == request_id]
        if runs and all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        if time.monotonic() > deadline:
            pytest.fail(
                f"{deployment}: runs not final: {[(r.name, r.state_name, r.parameters) for r in runs]}"
            )
        time.sleep(1)


def _owners(corpus: Path) -> list[str]:
    seen: list[str] = []
    for line in corpus.read_text().splitlines():
        owner = str(json.loads(line)["author_id"])
        if owner not in seen:
            seen.append(owner)
    return seen


def test_forget_event_and_drain_against_a_real_server(tmp_path: Path):
    prefect, sisaflow = executable_beside("prefect"), executable_beside("sisaflow")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    corpus = write_corpus(tmp_path / "corpus.jsonl", AUTHORS)
    ws = make_workspace(tmp_path / "ws", corpus)
    owner_x, owner_y = _owners(corpus)[:2]
    home = tmp_path / "prefect-home"
    home.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    started: list[subprocess.Popen] = []

    def sis(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sisaflow, "--workspace", str(ws), *args],
            cwd=ws,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    try:
        # the server starts while the workspace trains (ephemeral Prefect, no PREFECT_API_URL)
        server_proc, server = start_server(prefect, home, port)
        started.append(server_proc)
        t0 = time.monotonic()
        r = sis("run", "--in-process", env=clean_env())
        assert r.returncode == 0, f"sisaflow run failed:\n{r.stdout}\n{r.stderr}"
        print(f"\n[deletion-server] training run (ephemeral Prefect): {time.monotonic() - t0:.1f}s")
        print(
            f"[deletion-server] server healthy after a further {wait_healthy(server_proc, f'{server.api_url}/health', server.log, STARTUP_TIMEOUT_S):.1f}s"
        )

        r = server.run("work-pool", "create", POOL, "--type", "process", cwd=ws)
        assert r.returncode == 0, f"work-pool create failed:\n{r.stdout}\n{r.stderr}"
        r = server.run(
            "--no-prompt", "deploy", "--all", cwd=ws, env={**server.env, "SISAFLOW_WORKSPACE": str(ws)}
        )
        assert r.returncode == 0, f"prefect deploy --all failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        worker_log = logs / "worker-1.log"
        worker = _start_worker(server, ws, worker_log)
        started.append(worker)

        # 1. forget with a server configured: record, emit, return
        t0 = time.monotonic()
        r = sis("forget", "--owner", owner_x, "--request-id", "req-srv-x", env=server.env, timeout=120)
        forget_s = time.monotonic() - t0
        print(f"[deletion-server] `sisaflow forget` returned in {forget_s:.1f}s")
        assert r.returncode == 0, f"sisaflow forget failed:\n{r.stdout}\n{r.stderr}"
        assert "request req-srv-x recorded" in r.stdout, r.stdout
        assert "event sisaflow.deletion.requested sent" in r.stdout, r.stdout + r.stderr
        # it returned once recorded and emitted, not after the retraining (which is what a time limit here stood
        # for): the request is not retrained yet when it returns
        assert "retrained" not in _states(ws)["req-srv-x"]  # recorded only; the worker retrains

        watch = [(server_proc, server.log), (worker, worker_log)]
        certified_s = _wait_certified(ws, "req-srv-x", watch)
        print(f"[deletion-server] req-srv-x certified {certified_s:.1f}s after `forget` returned")
        assert _states(ws)["req-srv-x"] == ["pending", "excluded", "retrained", "purged", "certified"]
        assert (ws / "reports" / "certificates" / "req-srv-x.json").is_file()
        runs = _final_runs(server, FORGET, "req-srv-x")
        assert len(runs) == 1 and runs[0].state.is_completed(), (
            f"{[(x.name, x.state_name) for x in runs]}\n{tail(worker_log)}"
        )

        # 2. drain: a request recorded while nothing runs, applied by the drain deployment after a restart
        stop_group(worker)
        stop_group(server_proc)
        r = sis("forget", "--owner", owner_y, "--request-id", "req-srv-y", "--no-run", env=clean_env())
        assert r.returncode == 0, f"sisaflow forget --no-run failed:\n{r.stdout}\n{r.stderr}"
        # recorded, and (unlearn.mode exclude) marked excluded at once; nothing retrained yet
        assert _states(ws)["req-srv-y"] in (["pending"], ["pending", "excluded"])

        t0 = time.monotonic()
        server_proc, server = start_server(prefect, home, port)
        started.append(server_proc)
        print(
            f"[deletion-server] server restarted, healthy in {wait_healthy(server_proc, f'{server.api_url}/health', server.log, STARTUP_TIMEOUT_S):.1f}s"
        )
        worker_log = logs / "worker-2.log"
        worker = _start_worker(server, ws, worker_log)
        started.append(worker)
        r = server.run("deployment", "run", DRAIN, cwd=ws)
        assert r.returncode == 0, f"prefect deployment run failed:\n{r.stdout}\n{r.stderr}"
        watch = [(server_proc, server.log), (worker, worker_log)]
        drained_s = _wait_certified(ws, "req-srv-y", watch)
        print(f"[deletion-server] req-srv-y certified {drained_s:.1f}s after the drain run was created")
        assert _states(ws)["req-srv-y"] == ["pending", "excluded", "retrained", "purged", "certified"]
        assert (ws / "reports" / "certificates" / "req-srv-y.json").is_file()
        runs = _final_runs(server, DRAIN, None)
        assert len(runs) == 1 and runs[0].state.is_completed(), (
            f"{[(x.name, x.state_name) for x in runs]}\n{tail(worker_log)}"
        )
        print(f"[deletion-server] drain phase total: {time.monotonic() - t0:.1f}s")
    finally:
        for proc in reversed(started):
            stop_group(proc)
