"""The forget flow: apply the recorded deletion requests. Triggered by `sisaflow.deletion.requested`.

The request is already in the ledger when this runs (`sisaflow forget` writes it first), so the flow only
re-imports without the forgotten records, rewrites the touched slices, retrains the touched shards from their
first touched slice, and promotes the new ensemble.
"""

from __future__ import annotations

from prefect import flow

from sisaflow import pipeline
from sisaflow.paths import Workspace
from sisaflow_flows.steps import run_steps


@flow(name="sisaflow-forget", log_prints=True)
def forget_flow(workspace: str = ".", request_id: str | None = None, in_process: bool = False) -> dict:
    """Finish every open deletion request (the one that triggered this run and any queued beside it)."""
    ws = Workspace(workspace)
    if request_id and request_id not in pipeline.open_requests(ws):
        print(f"request {request_id} is already certified")
    return run_steps(workspace, "forget", in_process=in_process)
