"""The training flow: bring every shard's constituent up to date with the corpus, then publish the ensemble.

Idempotent: with nothing changed it trains nothing. Deployed on a schedule by prefect.yaml.
"""

from __future__ import annotations

from prefect import flow

from sisaflow.flows.signing import signed_run
from sisaflow.flows.steps import run_steps
from sisaflow.pipeline.report import RunResult


@flow(name="sisaflow-train", log_prints=True)
def training_flow(
    workspace: str = ".", in_process: bool = False, signing_key_secret: str | None = None
) -> RunResult:
    """prepare -> shard -> train stale shards (Ray) -> ensemble -> record in DVC (and, for requests it applies,
    purge -> scan -> certify, signed with the key of the Secret block `signing_key_secret` when named)."""
    with signed_run(workspace, signing_key_secret):
        return run_steps(workspace, "run", in_process=in_process)
