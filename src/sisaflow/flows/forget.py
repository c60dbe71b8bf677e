"""The forget flow: apply the recorded deletion requests. Triggered by `sisaflow.deletion.requested`.

The request is already in the ledger when this runs (`sisaflow forget` writes it first), so the flow only
re-imports without the forgotten records, rewrites the touched slices, retrains the touched shards from their
first touched slice, and promotes the new ensemble (`sisaflow.pipeline.sequence`; `sisaflow forget --no-prefect` runs
the same sequence without Prefect). What it did is published as a markdown artifact (`sisaflow.flows.artifacts`).
"""

from __future__ import annotations

from prefect import flow

from sisaflow.flows import artifacts
from sisaflow.flows.signing import signed_run
from sisaflow.flows.steps import PrefectRunner
from sisaflow.pipeline import sequence
from sisaflow.pipeline.report import RunResult


@flow(name="sisaflow-forget", log_prints=True)
def forget_flow(
    workspace: str = ".",
    request_id: str | None = None,
    in_process: bool = False,
    signing_key_secret: str | None = None,
) -> RunResult:
    """Finish every open deletion request (the one that triggered this run and any queued beside it).
    `signing_key_secret` names a Prefect Secret block holding the Ed25519 signing key (PEM)."""
    with signed_run(workspace, signing_key_secret):
        result = sequence.forget(workspace, request_id, in_process, PrefectRunner())
    artifacts.publish(workspace, result)
    return result
