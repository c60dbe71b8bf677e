"""The drain flow: on a schedule, apply deletion requests recorded while no server or worker was running."""

from __future__ import annotations

from prefect import flow

from sisaflow import pipeline
from sisaflow.paths import Workspace
from sisaflow_flows.steps import run_steps


@flow(name="sisaflow-drain", log_prints=True)
def drain_flow(workspace: str = ".") -> dict:
    """Run the forget steps if any request is pending, or was left unfinished (retrained or purged, not yet
    certified) by a run that was killed; otherwise do nothing."""
    ws = Workspace(workspace)
    pending = [r.request_id for r in pipeline.pending_requests(ws)] + pipeline.unfinished_requests(ws)
    if not pending:
        print("no pending deletion requests")
        return {"requests": []}
    return run_steps(workspace, "forget", requests=pending)
