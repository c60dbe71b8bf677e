"""The steps of a run, each written once as a library function `step(ws, params, *args)`, and `STEPS`, the one
table of them that both ways of running use: `sequence` calls them through a runner (in this process, or as
Prefect tasks that `sisaflow.flows` makes from this table with the retries it names).

run:    prepare -> shard -> train (stale shards only, on Ray) -> ensemble -> record (dvc commit)
forget: the same steps, with metrics before and, for the requests the run applied, purge -> scan -> certify;
        only the touched shards are stale, from their first touched slice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sisaflow.core import ledger, versioning
from sisaflow.core.config import Params
from sisaflow.core.errors import DeletionError
from sisaflow.core.hashing import workspace_hasher
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import Exclusions, ImportReport, import_corpus
from sisaflow.data.sharding import ShardReport, read_shard_manifest, shard_corpus, slice_digests
from sisaflow.inference.registry import build_registry
from sisaflow.training.checkpoint import read_meta, weights_hash
from sisaflow.training.lineage import chain_hashes, first_stale_slice

if TYPE_CHECKING:
    from sisaflow.deletion.leftovers import ScanSummary
    from sisaflow.deletion.purge import PurgeReport

log = logging.getLogger("sisaflow")
Progress = Callable[[str], None]
LEDGER_DEP = "deletions/ledger.jsonl"
"""The ledger as the prepare stage of dvc.yaml names it."""


def load(ws: Workspace) -> Params:
    """The workspace's params."""
    return Params.load(ws.params_file)


def prepare(
    ws: Workspace, params: Params, request_ids: list[str] | None = None, corpus_file: Path | None = None
) -> ImportReport:
    """Import the corpus source minus every record named in the deletion ledger and every record carrying a
    deleted record's text (under another id or owner). Refuses while the ledger lacks a request that a
    certificate or an impact record in the workspace names: the records it erased (or was erasing) would come
    back.

    `request_ids` limits the deletions to those requests: a run passes the ledger as it read it when it started,
    so a request recorded since waits for the next run (which records its impact before applying it)."""
    from sisaflow.deletion.impact import unrecorded_requests

    lost = unrecorded_requests(ws)
    if lost:
        raise DeletionError(
            f"{ws.ledger_file} lacks {len(lost)} request(s) that a certificate or an impact record of this "
            f"workspace names ({', '.join(lost[:5])}): it was rolled back "
            "(a git checkout, a restored backup?), and importing now would bring their records back. Restore the "
            "ledger (git log -- deletions/ledger.jsonl), then run again"
        )
    reqs = ledger.selected(ws.ledger_file, request_ids)  # read once
    ledger.require_hash_key(reqs, params.corpus.hash_key)
    exclusions = Exclusions(
        owners=frozenset(o for r in reqs for o in r.owners),
        records=frozenset(i for r in reqs for i in r.records),
        text_hashes=frozenset(h for r in reqs for h in r.text_hashes),
        content_hashes=frozenset(h for r in reqs for h in r.content_hashes),
    )
    target = ws.corpus_file if corpus_file is None else corpus_file  # elsewhere: verify --exact's rebuild
    hasher = workspace_hasher(ws, params.corpus)
    return import_corpus(ws.source(params.corpus.path), params.corpus, target, exclusions, hasher)


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
    in_process: bool = False,
    *,
    progress: Progress | None = None,
):
    """Train `shards` (Ray by default; in this process with in_process=True). Returns a ParallelReport."""
    from sisaflow.training.loop import train_shard
    from sisaflow.training.ray_launcher import ParallelReport, train_shards

    if shards and params.model.base is not None:
        from sisaflow.models.pretrained import check_base

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


def record(ws: Workspace, params: Params, request_ids: list[str] | None = None) -> dict:
    """Write dvc.yaml if the shard count changed, and commit the training stages' outputs to dvc.lock
    (`sisaflow evaluate` records its own stage); returns what `dvc status` still finds changed.

    `request_ids` are the requests the import left out (the ledger as the run read it). If the ledger holds more
    by now, dvc.lock records the import with the ledger it read, not the newer one: `dvc status` then shows
    the import as changed, and `dvc repro` (or the next run) applies the later requests."""
    versioning.write_dvc_yaml(ws, params)
    if versioning.ensure_remote(ws, params):  # before purge collects it and the scan searches it
        log.info("DVC remote now %s, as params' dvc.remote says", params.dvc.remote)
    stages = versioning.stage_names(params)
    versioning.commit(ws, stages)
    if request_ids is not None:
        read, later = ledger.prefix_of(ws.ledger_file, request_ids)
        if later:
            log.info(
                "%d request(s) recorded during this run (%s) wait for the next one",
                len(later),
                ", ".join(later[:5]),
            )
            versioning.pin_dependency(ws, "prepare", LEDGER_DEP, read)
    return versioning.status(ws, stages)


def snapshot_before(ws: Workspace, params: Params, request_ids: list[str], run_id: str) -> str | None:
    """Aggregates of the to-be-forgotten records under the ensemble trained on them (reports/before/)."""
    from sisaflow.evaluation.evaluate import snapshot_before as snapshot

    path = snapshot(ws, params, request_ids, run_id)
    return str(path) if path else None


def purge(ws: Workspace, params: Params) -> PurgeReport:
    """Remove every old copy: superseded files in the DVC cache and remote, the run cache, temp files."""
    from sisaflow.deletion.purge import purge as purge_workspace

    return purge_workspace(ws, params)


def scan(ws: Workspace, params: Params, request_ids: list[str]) -> ScanSummary:
    """Search everywhere for the requests' records and retired weights."""
    from sisaflow.deletion.leftovers import summary

    return summary(ws, params, request_ids)


def certify(ws: Workspace, params: Params, request_id: str) -> list[str]:
    """Issue the request's certificate (JSON and HTML); their paths."""
    from sisaflow.deletion.certificate import certify as issue

    return [str(p) for p in issue(ws, request_id)]


@dataclass(frozen=True)
class Step:
    """One entry of the table: the function, the name its Prefect task runs under, and its retries."""

    function: Callable[..., Any]
    task_name: str
    retries: int = 0
    retry_delay_seconds: float = 0
    progress: bool = False
    """The function takes `progress`, a callable for lines to show while it works."""


STEPS: dict[str, Step] = {
    "snapshot_before": Step(snapshot_before, "metrics-before-deletion"),
    "prepare": Step(prepare, "prepare"),
    "shard": Step(shard, "shard"),
    "stale": Step(stale_shards, "find-stale-shards"),
    # training resumes from the last complete checkpoint, so a retry continues where the failure stopped
    "train": Step(train, "train-shards", retries=2, retry_delay_seconds=5, progress=True),
    "ensemble": Step(ensemble, "ensemble"),
    "record": Step(record, "record-in-dvc"),
    "purge": Step(purge, "purge"),
    "scan": Step(scan, "scan-for-copies"),
    "certify": Step(certify, "certify"),
}


def run_step(name: str, root: str, *args: Any, progress: Progress | None = None) -> Any:
    """Run the step `name` of the table on the workspace at `root` (a string: Prefect passes it as a task's
    parameter), with its params read afresh: a retried step sees what the failed try left."""
    step = STEPS[name]
    ws = Workspace(Path(root))
    kwargs = {"progress": progress} if step.progress else {}
    return step.function(ws, load(ws), *args, **kwargs)


# ---- what the sequence measures around the steps ----


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
