"""The drain flow: on a schedule, apply deletion requests recorded while no server or worker was running; what
it did is published as a markdown artifact (`sisaflow.flows.artifacts`)."""

from __future__ import annotations

from prefect import flow

from sisaflow.flows import artifacts
from sisaflow.flows.signing import signed_run
from sisaflow.flows.steps import PrefectRunner
from sisaflow.pipeline import sequence
from sisaflow.pipeline.report import RunResult


@flow(name="sisaflow-drain", log_prints=True)
def drain_flow(
    workspace: str = ".", in_process: bool = False, signing_key_secret: str | None = None
) -> RunResult | None:
    """Run the forget steps if any request is not yet certified (recorded while nothing ran, or left
    unfinished by a run that was killed at any step); otherwise do nothing. `signing_key_secret` names a
    Prefect Secret block holding the Ed25519 signing key (PEM)."""
    with signed_run(workspace, signing_key_secret):
        result = sequence.drain(workspace, in_process, PrefectRunner())
    artifacts.publish(workspace, result)
    return result
