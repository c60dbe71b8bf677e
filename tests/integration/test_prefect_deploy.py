"""`prefect deploy --all` of the shipped prefect.yaml against a real, throwaway Prefect server.

One server per module (own PREFECT_HOME, free port, analytics off), stopped by its process group at the end.
The deployments are made from a copy of prefect.yaml in a temporary directory (the flows are the installed
package's, named by module), so the test does not depend on (or write into) the repository's state, but it
tests the file the repository ships.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from tests.integration.procs import (
    clean_env,
    executable_beside,
    free_port,
    start_logged,
    stop_group,
    tail,
    wait_healthy,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAME = "demo"  # the shipped prefect.yaml: the repository is the demo workspace
POOL = f"sisaflow-{NAME}"
EVENT = "sisaflow.deletion.requested"
# "<flow name>/<deployment name>" -> entrypoint
DEPLOYMENTS = {
    f"sisaflow-train/{NAME}-full-retraining": "sisaflow.flows.training.training_flow",
    f"sisaflow-forget/{NAME}-forget": "sisaflow.flows.forget.forget_flow",
    f"sisaflow-drain/{NAME}-drain-deletions": "sisaflow.flows.drain.drain_flow",
}
PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SISAFLOW_WORKSPACE }}"}}]
# A loaded 2-core machine can take a while to migrate the database and start the services.
STARTUP_TIMEOUT_S = float(os.environ.get("SISAFLOW_TEST_PREFECT_STARTUP_S", "120"))
COMMAND_TIMEOUT_S = 300


@dataclass
class Server:
    api_url: str
    env: dict[str, str]
    prefect: str
    log: Path

    def run(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.prefect, *args],
            cwd=cwd,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )

    def api(self, fn):
        """Run `await fn(client)` with a Prefect client pointed at this server."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def main():
            async with get_client() as client:
                return await fn(client)

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            return asyncio.run(main())


def start_server(prefect: str, home: Path, port: int) -> tuple[subprocess.Popen, Server]:
    """`prefect server start` on loopback with its own PREFECT_HOME, in its own session."""
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**clean_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url}
    log = home / "server.log"
    cmd = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    # No scheduler: schedules are stored either way, and no scheduled run starts behind a test's back.
    proc = start_logged([*cmd, "--no-scheduler", "--no-late-runs"], home, env, log)
    return proc, Server(api_url=api_url, env=env, prefect=prefect, log=log)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    proc, srv = start_server(
        executable_beside("prefect"), tmp_path_factory.mktemp("prefect-home"), free_port()
    )
    try:
        wait_healthy(proc, f"{srv.api_url}/health", srv.log, STARTUP_TIMEOUT_S)
        yield srv
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def deployed(server: Server, tmp_path_factory) -> Path:
    """A copy of the shipped prefect.yaml, deployed with `prefect --no-prompt deploy --all`."""
    ws = tmp_path_factory.mktemp("workspace")
    shutil.copy2(REPO / "prefect.yaml", ws / "prefect.yaml")

    r = server.run("work-pool", "create", POOL, "--type", "process", cwd=ws)
    assert r.returncode == 0, f"work-pool create failed:\n{r.stdout}\n{r.stderr}"
    # SISAFLOW_WORKSPACE is unset here, so the pull step keeps its placeholder for the worker to resolve.
    r = server.run("--no-prompt", "deploy", "--all", cwd=ws)
    assert r.returncode == 0, f"prefect deploy --all failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return ws


def _deployments(server: Server) -> dict:
    async def read(client):
        return {name: await client.read_deployment_by_name(name) for name in DEPLOYMENTS}

    return server.api(read)


def test_template_renders_to_shipped_prefect_yaml():
    from sisaflow.pipeline.create import prefect_yaml

    shipped = (REPO / "prefect.yaml").read_text()
    template = (REPO / "src/sisaflow/flows/prefect.template.yaml").read_text()
    assert "{{NAME}}" in template
    assert prefect_yaml(NAME) == shipped
    assert template.replace("{{NAME}}", NAME) == shipped


def test_a_workspace_is_named_after_its_directory_in_prefect_safe_characters():
    from sisaflow.pipeline.create import prefect_yaml, workspace_name

    assert workspace_name(Path("/data/tofu-prod")) == "tofu-prod"
    assert workspace_name(Path("/data/my models (v2)")) == "my-models-v2"
    assert workspace_name(Path("/data/...")) == "workspace"
    text = prefect_yaml("tofu-prod")
    assert (
        "{{NAME}}" not in text
        and "sisaflow.workspace.tofu-prod" in text
        and "name: sisaflow-tofu-prod" in text
    )


def test_deploy_all_creates_the_three_deployments(server: Server, deployed: Path):
    deps = _deployments(server)
    for name, entrypoint in DEPLOYMENTS.items():
        d = deps[name]
        assert d.entrypoint == entrypoint, name
        assert d.work_pool_name == POOL, name
        assert d.parameters.get("workspace") == ".", name
        assert d.pull_steps == PULL_STEPS, name
        # one run at a time, the next queued rather than Running while it waits on the workspace lock
        assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1, name
        assert d.concurrency_options is not None, name
        assert str(d.concurrency_options.collision_strategy.value) == "ENQUEUE", name

    train = deps[f"sisaflow-train/{NAME}-full-retraining"].schedules
    assert len(train) == 1 and train[0].active
    assert train[0].schedule.cron == "0 3 * * 0"
    assert train[0].schedule.timezone == "UTC"

    drain = deps[f"sisaflow-drain/{NAME}-drain-deletions"].schedules
    assert len(drain) == 1 and drain[0].active
    assert drain[0].schedule.interval == timedelta(seconds=900)

    assert deps[f"sisaflow-forget/{NAME}-forget"].schedules == []


def test_forget_deployment_has_the_deletion_event_trigger(server: Server, deployed: Path):
    deps = _deployments(server)
    automations = server.api(lambda c: c.read_automations())
    by_target: dict[str, list] = {name: [] for name in DEPLOYMENTS}
    for a in automations:
        for action in a.actions:
            for name, d in deps.items():
                if getattr(action, "deployment_id", None) == d.id:
                    by_target[name].append((a, action))
    assert not by_target[f"sisaflow-train/{NAME}-full-retraining"]
    assert not by_target[f"sisaflow-drain/{NAME}-drain-deletions"]
    assert len(by_target[f"sisaflow-forget/{NAME}-forget"]) == 1, automations

    automation, action = by_target[f"sisaflow-forget/{NAME}-forget"][0]
    assert automation.enabled
    trigger = automation.trigger.model_dump(mode="json")
    assert trigger["type"] == "event"
    assert trigger["posture"] == "Reactive" and trigger["threshold"] == 1
    assert set(trigger["expect"]) == {EVENT}
    assert trigger["match"] == {"prefect.resource.id": f"sisaflow.workspace.{NAME}"}
    assert action.type == "run-deployment"
    assert "event.payload.request_id" in json.dumps(action.parameters)


def _wait_for_run(server: Server, deployment_id, predicate, timeout_s: float):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
    deadline = time.monotonic() + timeout_s
    while True:
        runs = server.api(lambda c: c.read_flow_runs(flow_run_filter=flt))
        hits = [r for r in runs if predicate(r)]
        if hits or time.monotonic() > deadline:
            return hits, runs
        time.sleep(1)


def test_worker_runs_a_flow_in_the_workspace(server: Server, deployed: Path, tmp_path: Path):
    """A process worker with SISAFLOW_WORKSPACE runs the drain flow: the pull step moves it into the workspace,
    where the flow's workspace "." is found (it would not be from the worker's temp directory)."""
    drain = _deployments(server)[f"sisaflow-drain/{NAME}-drain-deletions"]
    run = server.api(lambda c: c.create_flow_run_from_deployment(drain.id))

    env = {**server.env, "SISAFLOW_WORKSPACE": str(deployed), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    log = tmp_path / "worker.log"
    worker = start_logged([server.prefect, "worker", "start", "--pool", POOL], tmp_path, env, log)
    try:
        hits, runs = _wait_for_run(
            server, drain.id, lambda r: r.id == run.id and r.state is not None and r.state.is_final(), 240
        )
    finally:
        stop_group(worker)
    assert hits, f"drain run not finished; runs: {[(r.name, r.state_name) for r in runs]}\n{tail(log)}"
    assert hits[0].state.is_completed(), f"drain run {hits[0].state_name}:\n{tail(log)}"


def test_deletion_event_starts_a_forget_run(server: Server, deployed: Path):
    forget = _deployments(server)[f"sisaflow-forget/{NAME}-forget"]
    request_id = f"test-{uuid.uuid4().hex[:12]}"
    r = server.run(
        "event",
        "emit",
        EVENT,
        "--resource-id",
        f"sisaflow.workspace.{NAME}",
        "--payload",
        json.dumps({"request_id": request_id}),
        cwd=deployed,
    )
    assert r.returncode == 0, f"event emit failed:\n{r.stdout}\n{r.stderr}"
    hits, runs = _wait_for_run(server, forget.id, lambda x: x.parameters.get("request_id") == request_id, 90)
    assert hits, (
        f"no forget run for {request_id}; forget runs: {[x.parameters for x in runs]}\n{tail(server.log)}"
    )
    assert hits[0].parameters.get("workspace") == "."
    server.api(lambda c: c.delete_flow_run(hits[0].id))  # nobody is to run it


def test_two_workspaces_on_one_server_keep_apart(server: Server, deployed: Path, tmp_path: Path):
    """A second workspace deployed to the same server gets deployments, a work pool and a trigger of its own: its
    deletion event starts its own forget deployment, never the first workspace's."""
    from sisaflow.pipeline.create import prefect_yaml

    other = tmp_path / "other"
    other.mkdir()
    (other / "prefect.yaml").write_text(prefect_yaml("other"))
    assert server.run("work-pool", "create", "sisaflow-other", "--type", "process", cwd=other).returncode == 0
    r = server.run("--no-prompt", "deploy", "--all", cwd=other)
    assert r.returncode == 0, f"prefect deploy --all failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"

    mine = _deployments(server)  # the first workspace's are still there, unchanged
    assert {d.work_pool_name for d in mine.values()} == {POOL}
    theirs = server.api(lambda c: c.read_deployment_by_name("sisaflow-forget/other-forget"))
    assert (
        theirs.work_pool_name == "sisaflow-other" and theirs.id != mine[f"sisaflow-forget/{NAME}-forget"].id
    )

    request_id = f"other-{uuid.uuid4().hex[:12]}"
    payload = json.dumps({"request_id": request_id})
    r = server.run(
        "event", "emit", EVENT, "--resource-id", "sisaflow.workspace.other", "--payload", payload, cwd=other
    )
    assert r.returncode == 0, f"event emit failed:\n{r.stdout}\n{r.stderr}"
    hits, _ = _wait_for_run(server, theirs.id, lambda x: x.parameters.get("request_id") == request_id, 90)
    assert hits, f"no forget run of the other workspace for {request_id}\n{tail(server.log)}"
    ours, _ = _wait_for_run(
        server,
        mine[f"sisaflow-forget/{NAME}-forget"].id,
        lambda x: x.parameters.get("request_id") == request_id,
        5,
    )
    assert ours == []
