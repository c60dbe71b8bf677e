"""The steps of a run, as plain library functions. The CLI and the Prefect flows are thin adapters over these.

run:    prepare -> shard -> train (stale shards only, on Ray) -> ensemble -> record (dvc commit)
forget: request (ledger) -> the same steps; only the touched shards are stale, from their touched slice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sisaflow import ledger, versioning
from sisaflow.checkpoint import read_meta, weights_hash
from sisaflow.config import Params
from sisaflow.corpus import from_table, import_corpus, read_table
from sisaflow.errors import DeletionError
from sisaflow.fsio import write_json
from sisaflow.lineage import chain_hashes, first_stale_slice
from sisaflow.paths import Workspace
from sisaflow.registry import build_registry
from sisaflow.sharding import ShardReport, read_shard_manifest, shard_corpus, slice_digests

log = logging.getLogger("sisaflow")
Progress = Callable[[str], None]


def load(ws: Workspace) -> Params:
    """The workspace's params."""
    return Params.load(ws.params_file)


@contextlib.contextmanager
def workspace_lock(ws: Workspace, what: str = "run", waiting: Progress | None = None) -> Iterator[None]:
    """One run, forget or purge at a time per workspace; a second one waits, and says so through `waiting`.

    The holder writes who it is into the lock file, so the one that waits can name it. Deletion requests do
    not take this lock (the ledger has its own): a request that arrives during a run is recorded at once and
    queued; the next run applies every pending request together.
    """
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    # "a+": opening must not truncate the holder's note
    with open(ws.lock_file, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            message = (
                f"{ws.root}: waiting for the active {holder} to finish (one run at a time per workspace)"
            )
            log.info(message)
            if waiting is not None:
                waiting(message)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{what} (pid {os.getpid()}, since {datetime.now(UTC).isoformat(timespec='seconds')})")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(ws: Workspace, params: Params, corpus_file: Path | None = None) -> dict[str, int]:
    """Import the corpus source minus every record named in the deletion ledger. Refuses while the ledger lacks a
    request that a certificate in the workspace certifies: the records it erased would come back."""
    from sisaflow.proof import certified_but_unrecorded

    lost = certified_but_unrecorded(ws)
    if lost:
        raise DeletionError(
            f"{ws.ledger_file} lacks {len(lost)} certified request(s) ({', '.join(lost[:5])}): it was rolled back "
            "(a git checkout, a restored backup?), and importing now would bring their records back. Restore the "
            "ledger (git log -- deletions/ledger.jsonl), then run again"
        )
    owners, records = ledger.excluded(ws.ledger_file)
    target = ws.corpus_file if corpus_file is None else corpus_file  # elsewhere: verify --exact's rebuild
    return import_corpus(ws.source(params.corpus.path), params.corpus, target, owners, records)


def shard(ws: Workspace, params: Params) -> ShardReport:
    """Place records into shards and slices; rewrite only the slice files whose content changed."""
    return shard_corpus(ws, params.sharding, allow_empty=bool(ledger.read_ledger(ws.ledger_file)))


def stale_shards(ws: Workspace, params: Params) -> dict[int, int]:
    """{shard: first stale slice} for every shard whose checkpoints do not match its current data."""
    out = {}
    for s in params.sharding.shard_ids:
        manifest = read_shard_manifest(ws, s)
        digests = slice_digests(manifest)
        k = first_stale_slice(ws, s, chain_hashes(params.training_identity(), digests))
        if k < params.sharding.slices:
            out[s] = k
    return out


def train(
    ws: Workspace,
    params: Params,
    shards: list[int],
    progress: Progress | None = None,
    in_process: bool = False,
):
    """Train `shards` (Ray by default; in this process with in_process=True). Returns a ParallelReport."""
    from sisaflow.parallel import ParallelReport, train_shards
    from sisaflow.training import train_shard

    if shards and params.model.base is not None:
        from sisaflow.pretrained import check_base

        check_base(params.model)  # here, before Ray starts: a bad base fails the run as this ConfigError
    if not in_process:
        return train_shards(ws, params, shards, progress)
    report = ParallelReport(address="in-process")
    t0 = time.perf_counter()
    for s in shards:
        report.shards.append(train_shard(ws, s, params, progress))
    report.wall_seconds = time.perf_counter() - t0
    return report


def ensemble(ws: Workspace, params: Params) -> dict:
    """Register the trained constituents as the served ensemble version."""
    return build_registry(ws, params)


def record(ws: Workspace, params: Params) -> dict:
    """Write dvc.yaml if the shard count changed, and commit the training stages' outputs to dvc.lock
    (`sisaflow evaluate` records its own stage)."""
    versioning.write_dvc_yaml(ws, params)
    if versioning.ensure_remote(ws, params):  # before purge collects it and the scan searches it
        log.info("DVC remote now %s, as params' dvc.remote says", params.dvc.remote)
    stages = versioning.stage_names(params)
    versioning.commit(ws, stages)
    return versioning.status(ws, stages)


def lock_entries(ws: Workspace) -> dict:
    """The stages recorded in dvc.lock (empty before the first run)."""
    import yaml

    if not ws.dvc_lock.is_file():
        return {}
    return (yaml.safe_load(ws.dvc_lock.read_text()) or {}).get("stages", {})


def changed_lock_entries(before: dict, after: dict) -> list[str]:
    """Names of the dvc.lock stages whose recorded hashes differ."""
    return sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))


def full_training_tokens(ws: Workspace, params: Params) -> int:
    """The tokens a full training of the current checkpoints processed (the denominator of forget's cost)."""
    total = 0
    for s in params.sharding.shard_ids:
        meta = read_meta(ws.checkpoint_dir(s, params.sharding.slices - 1))
        total += meta.tokens_seen if meta else 0
    return total


def checkpoint_hashes(ws: Workspace, params: Params) -> dict[int, dict[int, str]]:
    """{shard: {slice: sha256 of weights}} for every complete checkpoint."""
    out: dict[int, dict[int, str]] = {}
    for s in params.sharding.shard_ids:
        out[s] = {}
        for k in range(params.sharding.slices):
            d = ws.checkpoint_dir(s, k)
            if read_meta(d) is not None:
                out[s][k] = weights_hash(d)
    return out


def cost_model_formula(schedule: str) -> str:
    return "(1/S)(2R+1)/(3R)" if schedule == "cumulative" else "(1/S)(R+1)/(2R)"


def cost_model(shards: int, slices: int, schedule: str) -> float:
    """Expected fraction of a full training that one deletion at a random record retrains."""
    if schedule == "cumulative":
        return (2 * slices + 1) / (3 * slices) / shards
    return (slices + 1) / (2 * slices) / shards


# ---- deletion requests ----


def resolve_request(
    ws: Workspace, owners: list[str], records: list[str], unknown: str = "error"
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Check the named owners and records against the imported corpus.

    Returns (content hashes covered, owners kept, records kept, warnings). With unknown="error" an unknown
    name refuses the whole request (nothing is recorded); with "warn" it is dropped with a warning.
    """
    if not owners and not records:
        raise DeletionError("a deletion request must name at least one owner or record")
    if not ws.corpus_file.is_file():
        raise DeletionError(f"{ws.corpus_file}: no imported corpus yet; run `sisaflow run` first")
    corpus = from_table(read_table(ws.corpus_file))
    known_owners = {r.owner for r in corpus}
    known_records = {r.record_id for r in corpus}
    bad_owners = sorted(set(owners) - known_owners)
    bad_records = sorted(set(records) - known_records)
    warnings = []
    if bad_owners or bad_records:
        parts = []
        if bad_owners:
            parts.append(f"unknown owner(s): {', '.join(bad_owners[:10])}")
        if bad_records:
            parts.append(f"unknown record(s): {', '.join(bad_records[:10])}")
        message = "; ".join(parts) + " (not in the current corpus; already forgotten or never present)"
        earlier = _earlier_requests(ws, set(bad_owners), set(bad_records))
        if earlier:
            message += "; already forgotten by " + ", ".join(earlier)
        if unknown == "error":
            raise DeletionError(message)
        warnings.append(message)
    owners = sorted(set(owners) & known_owners)
    records = sorted(set(records) & known_records)
    if not owners and not records:
        raise DeletionError("nothing to forget: " + "; ".join(warnings))
    covered = [r for r in corpus if r.owner in set(owners) or r.record_id in set(records)]
    return sorted(r.content_hash for r in covered), owners, records, warnings


def _earlier_requests(ws: Workspace, owners: set[str], records: set[str]) -> list[str]:
    """'request R (state)' for each recorded request that names one of `owners` or `records`, with its
    certificate's path once certified: the proof to hand over for the same person's later request."""
    state = ledger.current_state(ws.ledger_file)
    out = []
    for r in ledger.read_ledger(ws.ledger_file):
        if owners & set(r.owners) or records & set(r.records):
            s = state.get(r.request_id, "pending")
            cert = ws.certificates_dir / f"{r.request_id}.json"
            out.append(
                f"request {r.request_id} ({s}" + (f"; certificate {cert}" if cert.is_file() else "") + ")"
            )
    return out


def request_deletion(
    ws: Workspace,
    owners: list[str],
    records: list[str],
    request_id: str | None = None,
    reason: str | None = None,
) -> tuple[ledger.DeletionRequest, bool, list[str]]:
    """Validate and durably record a deletion request. Returns (request, newly_recorded, warnings).

    The same request id with the same owners and records changes nothing, even after it was applied; the
    same id with other contents is refused. In unlearn.mode exclude, the request is marked excluded at once:
    from then on no generate or score call uses a constituent trained on its records.
    """
    params = load(ws)
    if request_id:
        for existing in ledger.read_ledger(ws.ledger_file):
            if existing.request_id == request_id:
                if (sorted(set(existing.owners)), sorted(set(existing.records))) != (
                    sorted(set(owners)),
                    sorted(set(records)),
                ):
                    raise DeletionError(f"request id {request_id!r} is already used by a different request")
                return existing, False, []
    hashes, owners, records, warnings = resolve_request(ws, owners, records, params.unlearn.unknown)
    req = ledger.DeletionRequest(
        request_id=request_id or ledger.new_request_id(),
        owners=owners,
        records=records,
        content_hashes=hashes,
        reason=reason,
    )
    new = ledger.append_request(ws.ledger_file, req)
    if new and params.unlearn.mode == "exclude":
        ledger.mark(ws.ledger_file, [req.request_id], "excluded")
    return req, new, warnings


def mark_applied(ws: Workspace) -> list[str]:
    """After a promotion: every request not yet retrained whose records are gone is now retrained."""
    still = {r.request_id for r in pending_requests(ws)}
    state = ledger.current_state(ws.ledger_file)
    done = [
        r.request_id
        for r in ledger.read_ledger(ws.ledger_file)
        if r.request_id not in still and state.get(r.request_id, "pending") in ("pending", "excluded")
    ]
    return ledger.mark(ws.ledger_file, done, "retrained")


def unfinished_requests(ws: Workspace) -> list[str]:
    """Requests retrained or purged but not certified: a forget killed after its promotion left them so."""
    state = ledger.current_state(ws.ledger_file)
    return [
        r.request_id
        for r in ledger.read_ledger(ws.ledger_file)
        if state.get(r.request_id) in ("retrained", "purged")
    ]


def open_requests(ws: Workspace) -> list[str]:
    """Requests not yet certified, in ledger order: what a drain or forget run has to finish. This includes
    requests whose records a killed run already removed from the corpus but whose shards are not retrained."""
    state = ledger.current_state(ws.ledger_file)
    return [
        r.request_id for r in ledger.read_ledger(ws.ledger_file) if state.get(r.request_id) != "certified"
    ]


def pending_requests(ws: Workspace) -> list[ledger.DeletionRequest]:
    """Requests whose records are still in the imported corpus or in a shard's placement."""
    reqs = ledger.read_ledger(ws.ledger_file)
    if not reqs:
        return []
    present_owners: set[str] = set()
    present_records: set[str] = set()
    if ws.corpus_file.is_file():
        t = read_table(ws.corpus_file).select(["record_id", "owner"]).to_pydict()
        present_owners, present_records = set(t["owner"]), set(t["record_id"])
    if ws.placement_file.is_file():
        present_records |= set(read_table(ws.placement_file).column("record_id").to_pylist())
    return [r for r in reqs if set(r.owners) & present_owners or set(r.records) & present_records]


# ---- run reports ----


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
    purge: dict | None = None
    verify: dict | None = None
    certificates: dict[str, list[str]] = field(default_factory=dict)
    orchestration: str = ""
    """What ran the steps: a Prefect flow run (named), or the library alone (--no-prefect)."""

    def save(self, ws: Workspace) -> None:
        write_json(ws.runs_dir / f"{self.run_id}-{self.kind}.json", asdict(self))


@contextlib.contextmanager
def timed(report: RunReport, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - t0
