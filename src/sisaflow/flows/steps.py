"""The library's step table (`sisaflow.pipeline.steps.STEPS`) as Prefect tasks: each entry becomes one task with
the name and retries the table gives it, so the UI shows a task run per step. The order, the locking and every
decision about a request's state are the library's (`sisaflow.pipeline.sequence`)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sisaflow.pipeline import sequence
from sisaflow.pipeline.report import RunResult
from sisaflow.pipeline.steps import STEPS, Step, run_step


def _as_task(name: str, step: Step):
    def run(root: str, args: list[Any]) -> Any:
        return run_step(name, root, *args, progress=get_run_logger().info)

    run.__name__ = run.__qualname__ = name
    # no caching: every task made here has the same source, so a cache key from inputs and source could take one
    # step's result for another's (and a step must run each time: it reads the workspace as it is now)
    return task(
        name=step.task_name,
        retries=step.retries,
        retry_delay_seconds=step.retry_delay_seconds,
        cache_policy=NO_CACHE,
    )(run)


TASKS = {name: _as_task(name, step) for name, step in STEPS.items()}


class PrefectRunner(sequence.StepRunner):
    """Runs each step as its task, inside the current flow run; progress goes to the flow run's logger."""

    def __init__(self) -> None:
        logger = get_run_logger()
        super().__init__(say=logger.info, warn=logger.warning, error=logger.error)

    @property
    def orchestration(self) -> str:  # type: ignore[override]
        from prefect.runtime import flow_run

        return f"prefect flow run {flow_run.id} ({flow_run.name})"

    def __call__(self, name: str, root: str, *args: Any) -> Any:
        return TASKS[name](root, list(args))


def run_steps(root: str, kind: str, in_process: bool = False) -> RunResult:
    """The library's sequence (`sisaflow.pipeline.sequence.run_steps`) with Prefect tasks for steps."""
    return sequence.run_steps(root, kind, in_process, PrefectRunner())
