"""The drain flow: on a schedule, apply deletion requests recorded while no server or worker was running."""

from __future__ import annotations

from prefect import flow

from sisaflow.flows.steps import PrefectRunner
from sisaflow.pipeline import sequence
from sisaflow.pipeline.report import RunResult


@flow(name="sisaflow-drain", log_prints=True)
def drain_flow(workspace: str = ".", in_process: bool = False) -> RunResult | None:
    """Run the forget steps if any request is not yet certified (recorded while nothing ran, or left
    unfinished by a run that was killed at any step); otherwise do nothing."""
    return sequence.drain(workspace, in_process, PrefectRunner())
