"""The library's run sequence (`sisaflow.sequence`) with each step as a Prefect task: retries, and a task run
per step in the UI. The order, the locking and every decision about a request's state are the library's."""

from __future__ import annotations

from prefect import get_run_logger, task

from sisaflow import sequence


def _steps() -> sequence.Steps:
    """The library's steps, reporting through the current run's logger."""
    logger = get_run_logger()
    return sequence.Steps(say=logger.info, warn=logger.warning, error=logger.error)


@task(name="prepare")
def prepare(root: str) -> dict:
    return _steps().prepare(root)


@task(name="shard")
def shard(root: str) -> dict:
    return _steps().shard(root)


@task(name="find-stale-shards")
def stale(root: str) -> dict[int, int]:
    return _steps().stale(root)


# Training resumes from the last complete checkpoint, so a retry continues where the failure stopped.
@task(name="train-shards", retries=2, retry_delay_seconds=5)
def train(root: str, shards: list[int], in_process: bool = False):
    return _steps().train(root, shards, in_process)


@task(name="ensemble")
def ensemble(root: str) -> dict:
    return _steps().ensemble(root)


@task(name="purge")
def purge(root: str) -> dict:
    return _steps().purge(root)


@task(name="scan-for-copies")
def scan(root: str, request_ids: list[str]) -> dict:
    return _steps().scan(root, request_ids)


@task(name="certify")
def certify(root: str, request_id: str) -> list[str]:
    return _steps().certify(root, request_id)


@task(name="metrics-before-deletion")
def snapshot_before(root: str, request_ids: list[str], run_id: str) -> str | None:
    return _steps().snapshot_before(root, request_ids, run_id)


@task(name="record-in-dvc")
def record(root: str) -> dict:
    return _steps().record(root)


class PrefectSteps(sequence.Steps):
    """Each step of the sequence as the task above, inside the current flow run."""

    def __init__(self) -> None:
        logger = get_run_logger()
        super().__init__(say=logger.info, warn=logger.warning, error=logger.error)

    @property
    def orchestration(self) -> str:
        from prefect.runtime import flow_run

        return f"prefect flow run {flow_run.id} ({flow_run.name})"

    def prepare(self, root: str) -> dict:
        return prepare(root)

    def shard(self, root: str) -> dict:
        return shard(root)

    def stale(self, root: str) -> dict[int, int]:
        return stale(root)

    def train(self, root: str, shards: list[int], in_process: bool = False):
        return train(root, shards, in_process=in_process)

    def ensemble(self, root: str) -> dict:
        return ensemble(root)

    def purge(self, root: str) -> dict:
        return purge(root)

    def scan(self, root: str, request_ids: list[str]) -> dict:
        return scan(root, request_ids)

    def certify(self, root: str, request_id: str) -> list[str]:
        return certify(root, request_id)

    def snapshot_before(self, root: str, request_ids: list[str], run_id: str) -> str | None:
        return snapshot_before(root, request_ids, run_id)

    def record(self, root: str) -> dict:
        return record(root)


def run_steps(root: str, kind: str, in_process: bool = False) -> dict:
    """The library's sequence (`sisaflow.sequence.run_steps`) with Prefect tasks for steps."""
    return sequence.run_steps(root, kind, in_process, PrefectSteps())
