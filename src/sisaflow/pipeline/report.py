"""The run report: what one run or forget did, step by step, kept as dataclasses until it is printed or written
(runs/<run id>-<kind>.json, `to_json`/`from_json`), and the cost model a forget's cost is compared with."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from sisaflow.core.fsio import write_json
from sisaflow.core.paths import Workspace
from sisaflow.deletion.certificate import AppliedRun


@dataclass
class RunReport(AppliedRun):
    """What one run or forget did; the fields a certificate reads are `AppliedRun`'s (retrained requests, shards
    trained, checkpoints before and after, purge and scan reports), and so is `to_json`/`from_json`."""

    kind: str = ""
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # names the report file; microseconds keep two runs started in one second apart and in order
    run_id: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ"))
    seconds: dict[str, float] = field(default_factory=dict)
    imported: dict = field(default_factory=dict)
    shards_rewritten: list[int] = field(default_factory=list)
    slices_rewritten: list[list[int]] = field(default_factory=list)
    training_tokens: int = 0
    full_training_tokens: int = 0
    requests: list[str] = field(default_factory=list)
    dvc_clean: bool = False
    lock_changed: list[str] = field(default_factory=list)
    certificates: dict[str, list[str]] = field(default_factory=dict)
    orchestration: str = ""
    """What ran the steps: a Prefect flow run (named), or the library alone (--no-prefect)."""

    def save(self, ws: Workspace) -> None:
        write_json(ws.runs_dir / f"{self.run_id}-{self.kind}.json", self.to_json())


@dataclass
class RunResult:
    """What `run_steps` returns: the report, the checkpoints' weights hashes before and after, and the cost
    model's expected fraction of a full training for one deletion."""

    report: RunReport
    checkpoints_before: dict[int, dict[int, str]]
    checkpoints_after: dict[int, dict[int, str]]
    cost_model: float
    cost_model_formula: str

    def to_json(self) -> dict:
        return {**asdict(self), "report": self.report.to_json()}


@contextlib.contextmanager
def timed(report: RunReport, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - t0


def cost_model_formula(schedule: str) -> str:
    return "(1/S)(2R+1)/(3R)" if schedule == "cumulative" else "(1/S)(R+1)/(2R)"


def cost_model(shards: int, slices: int, schedule: str) -> float:
    """Expected fraction of a full training that one deletion at a random record retrains."""
    if schedule == "cumulative":
        return (2 * slices + 1) / (3 * slices) / shards
    return (slices + 1) / (2 * slices) / shards
