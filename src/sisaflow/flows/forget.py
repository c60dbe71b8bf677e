"""The forget flow: apply the recorded deletion requests. Triggered by `sisaflow.deletion.requested`.

The request is already in the ledger when this runs (`sisaflow forget` writes it first), so the flow only
re-imports without the forgotten records, rewrites the touched slices, retrains the touched shards from their
first touched slice, and promotes the new ensemble (`sisaflow.pipeline.sequence`; `sisaflow forget --no-prefect` runs
the same sequence without Prefect).
"""

from __future__ import annotations

from prefect import flow

from sisaflow.flows.steps import PrefectRunner
from sisaflow.pipeline import sequence
from sisaflow.pipeline.report import RunResult


@flow(name="sisaflow-forget", log_prints=True)
def forget_flow(workspace: str = ".", request_id: str | None = None, in_process: bool = False) -> RunResult:
    """Finish every open deletion request (the one that triggered this run and any queued beside it)."""
    return sequence.forget(workspace, request_id, in_process, PrefectRunner())
