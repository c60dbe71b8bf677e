"""The run report: what one run or forget did, step by step, kept as dataclasses until it is printed or written
(runs/<run id>-<kind>.json, `to_json`/`from_json`), and the cost model a forget's cost is compared with."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime

from sisaflow.core.fsio import write_json
from sisaflow.core.paths import Workspace
from sisaflow.deletion.leftovers import ScanSummary
from sisaflow.deletion.purge import PurgeReport


@dataclass
class RunReport:
    kind: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # names the report file; microseconds keep two runs started in one second apart and in order
    run_id: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ"))
    seconds: dict[str, float] = field(default_factory=dict)
    imported: dict = field(default_factory=dict)
    shards_rewritten: list[int] = field(default_factory=list)
    slices_rewritten: list[list[int]] = field(default_factory=list)
    trained: dict[int, dict] = field(default_factory=dict)
    training_tokens: int = 0
    full_training_tokens: int = 0
    ensemble_version: str = ""
    requests: list[str] = field(default_factory=list)
    dvc_clean: bool = False
    lock_changed: list[str] = field(default_factory=list)
    retrained_requests: list[str] = field(default_factory=list)
    slices: int = 0
    checkpoints_before: dict = field(default_factory=dict)
    checkpoints_after: dict = field(default_factory=dict)
    purge: PurgeReport | None = None
    verify: ScanSummary | None = None
    certificates: dict[str, list[str]] = field(default_factory=dict)
    orchestration: str = ""
    """What ran the steps: a Prefect flow run (named), or the library alone (--no-prefect)."""

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("purge", "verify")}
        out = asdict(RunReport(**out))  # deep copies of the plain fields
        out["purge"] = self.purge.to_json() if self.purge else None
        out["verify"] = self.verify.to_json() if self.verify else None
        return out

    @classmethod
    def from_json(cls, raw: dict) -> RunReport:
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in raw.items() if k in known and k not in ("purge", "verify", "trained")})
        out.trained = {int(k): v for k, v in raw.get("trained", {}).items()}
        out.purge = PurgeReport.from_json(raw["purge"]) if raw.get("purge") else None
        out.verify = ScanSummary.from_json(raw["verify"]) if raw.get("verify") else None
        return out

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
