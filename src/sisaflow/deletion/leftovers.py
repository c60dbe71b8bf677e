"""The scan for what is left of deletion requests: their records (from the ledger's content hashes and the corpus
source) and the files of the checkpoints they retired (weights and optimizer state, from their impact records),
handed to the scan package, which searches the workspace, the DVC cache and remote, the Prefect home and git
history. `summary` is the scan as a run report and a certificate keep it: counts only, never a deleted record's
id or the paths that held it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from sisaflow.core import ledger
from sisaflow.core.config import Params
from sisaflow.core.paths import Workspace
from sisaflow.deletion.impact import retired_files
from sisaflow.scan.places import scan_report as scan_places
from sisaflow.scan.progress import ProgressCallback
from sisaflow.scan.targets import ScanReport, Target, targets_from_source


def targets_from_ledger(
    ws: Workspace, params: Params, request_ids: Iterable[str] | None = None
) -> list[Target]:
    """Targets for every content hash the deletion ledger records (or only those of `request_ids`)."""
    keep = set(request_ids) if request_ids is not None else None
    hashes: dict[str, str] = {}
    for req in ledger.read_ledger(ws.ledger_file):
        if keep is None or req.request_id in keep:
            for h in req.content_hashes:
                hashes.setdefault(h, req.request_id)
    return targets_from_source(ws, params, hashes) if hashes else []


def scan_report(
    ws: Workspace, params: Params, targets: list[Target], progress: ProgressCallback | None = None
) -> ScanReport:
    """Search every place for `targets` and for the weights and optimizer state of every checkpoint their requests
    retired; `progress(done, total)` in bytes as it goes."""
    retired = retired_files(ws, sorted({t.request_id for t in targets}))
    return scan_places(ws, params, targets, retired, progress=progress)


@dataclass
class ScanSummary:
    """The scan after a purge, as the run report and the certificate record it."""

    clean: bool
    findings: int
    findings_by_location: dict[str, int] = field(default_factory=dict)
    not_searched: dict[str, int] = field(default_factory=dict)
    source_holds: int | None = None
    files_scanned: int = 0
    bytes_scanned: int = 0
    git_objects_scanned: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> ScanSummary:
        return cls(**raw)


def summary(ws: Workspace, params: Params, request_ids: list[str]) -> ScanSummary:
    """The scan for `request_ids`' records and retired checkpoint files, in counts."""
    rep = scan_report(ws, params, targets_from_ledger(ws, params, request_ids))
    return ScanSummary(
        clean=rep.clean,
        findings=len(rep.findings),
        findings_by_location=rep.findings_by_location(),
        not_searched=rep.not_searched(),
        source_holds=rep.source_holds,
        files_scanned=rep.files_scanned,
        bytes_scanned=rep.bytes_scanned,
        git_objects_scanned=rep.git_objects_scanned,
    )
