"""The training flow: bring every shard's constituent up to date with the corpus, then publish the ensemble.

Idempotent: with nothing changed it trains nothing. Deployed on a schedule by prefect.yaml.
"""

from __future__ import annotations

from prefect import flow

from sisaflow.flows.steps import run_steps
from sisaflow.pipeline.report import RunResult


@flow(name="sisaflow-train", log_prints=True)
def training_flow(workspace: str = ".", in_process: bool = False) -> RunResult:
    """prepare -> shard -> train stale shards (Ray) -> ensemble -> record in DVC."""
    return run_steps(workspace, "run", in_process=in_process)
