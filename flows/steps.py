"""The steps shared by the training and forget flows, as Prefect tasks over `sisaflow.pipeline`."""

from __future__ import annotations

import json

from prefect import get_run_logger, task

from sisaflow import ledger, pipeline
from sisaflow.paths import Workspace
from sisaflow.proof import record_impact


def _say(message: str) -> None:
    get_run_logger().info(message)


@task(name="prepare")
def prepare(root: str) -> dict:
    ws = Workspace(root)
    return pipeline.prepare(ws, pipeline.load(ws))


@task(name="shard")
def shard(root: str) -> dict:
    ws = Workspace(root)
    rep = pipeline.shard(ws, pipeline.load(ws))
    return {
        "shards": rep.shards_written,
        "slices": [list(x) for x in rep.slices_written],
        "records": rep.records,
    }


@task(name="find-stale-shards")
def stale(root: str) -> dict[int, int]:
    ws = Workspace(root)
    return pipeline.stale_shards(ws, pipeline.load(ws))


# Training resumes from the last complete checkpoint, so a retry continues where the failure stopped.
@task(name="train-shards", retries=2, retry_delay_seconds=5)
def train(root: str, shards: list[int], in_process: bool = False):
    ws = Workspace(root)
    return pipeline.train(ws, pipeline.load(ws), shards, progress=_say, in_process=in_process)


@task(name="ensemble")
def ensemble(root: str) -> dict:
    ws = Workspace(root)
    return pipeline.ensemble(ws, pipeline.load(ws))


@task(name="purge")
def purge(root: str) -> dict:
    from sisaflow.purge import purge as purge_workspace

    ws = Workspace(root)
    return purge_workspace(ws, pipeline.load(ws)).to_dict()


@task(name="scan-for-copies")
def scan(root: str, request_ids: list[str]) -> dict:
    from sisaflow.verify import scan_summary

    ws = Workspace(root)
    return scan_summary(ws, pipeline.load(ws), request_ids)


@task(name="certify")
def certify(root: str, request_id: str) -> list[str]:
    from sisaflow.proof import certify as write_certificate

    return [str(p) for p in write_certificate(Workspace(root), request_id)]


@task(name="metrics-before-deletion")
def snapshot_before(root: str, request_ids: list[str], run_id: str) -> str | None:
    """Aggregates of the to-be-forgotten records under the ensemble trained on them (reports/before/)."""
    from sisaflow.evaluation import snapshot_before as snapshot

    ws = Workspace(root)
    try:
        path = snapshot(ws, pipeline.load(ws), request_ids, run_id)
    except Exception as exc:  # measuring must never stop a deletion; the run goes on without the numbers
        get_run_logger().warning(f"before-deletion metrics not recorded ({type(exc).__name__}: {exc})")
        return None
    return str(path) if path else None


@task(name="record-in-dvc")
def record(root: str) -> dict:
    ws = Workspace(root)
    return pipeline.record(ws, pipeline.load(ws))


def run_steps(root: str, kind: str, in_process: bool = False) -> dict:
    """prepare -> shard -> train stale shards -> ensemble -> dvc commit; returns the run report as a dict."""
    ws = Workspace(root)
    params = pipeline.load(ws)
    logger = get_run_logger()
    with pipeline.workspace_lock(ws, f"sisaflow {kind}", waiting=logger.info):
        # made once the lock is held, so reports are named in the order runs applied their changes
        # the requests this run finishes: every one not yet certified, including any recorded while it waited
        # for the lock and any a killed run left half done
        report = pipeline.RunReport(kind=kind, requests=pipeline.open_requests(ws))
        pending = pipeline.pending_requests(ws)
        applying = [r.request_id for r in pending]
        before = pipeline.checkpoint_hashes(ws, params)
        # each request's shards, slices and checkpoints, before anything changes (kept if a crash comes)
        record_impact(ws, params, pending, before)
        if applying:
            with pipeline.timed(report, "metrics_before"):
                snapshot_before(root, applying, report.run_id)
        report.full_training_tokens = pipeline.full_training_tokens(ws, params)
        with pipeline.timed(report, "prepare"):
            report.imported = prepare(root)
        with pipeline.timed(report, "shard"):
            sharded = shard(root)
        report.shards_rewritten = sharded["shards"]
        report.slices_rewritten = sharded["slices"]
        todo = stale(root)
        if todo:
            logger.info("stale: " + ", ".join(f"shard {s} from slice {k}" for s, k in sorted(todo.items())))
            with pipeline.timed(report, "train"):
                trained = train(root, sorted(todo), in_process=in_process)
            report.seconds["ray_start"] = trained.ray_start_seconds
            for r in trained.shards:
                report.trained[r.shard] = {
                    "from_slice": r.start_slice,
                    "tokens": r.tokens,
                    "seconds": r.seconds,
                }
            report.training_tokens = sum(r.tokens for r in trained.shards)
        else:
            logger.info("every shard is up to date: nothing to train")
        with pipeline.timed(report, "ensemble"):
            report.ensemble_version = ensemble(root)["version"]
        # requests this run applied, then any a killed forget left retrained or purged: purge, scan, certify both
        applied = pipeline.mark_applied(ws)
        report.retrained_requests = applied + [
            r for r in pipeline.unfinished_requests(ws) if r not in applied
        ]
        lock_before = pipeline.lock_entries(ws)
        with pipeline.timed(report, "dvc"):
            report.dvc_clean = not record(root)
        report.lock_changed = pipeline.changed_lock_entries(lock_before, pipeline.lock_entries(ws))
        after = pipeline.checkpoint_hashes(ws, params)
        if report.retrained_requests:
            # no copy left: old shard files and checkpoints in the DVC cache and remote, run cache, temp files
            with pipeline.timed(report, "purge"):
                report.purge = purge(root)
            ledger.mark(ws.ledger_file, report.retrained_requests, "purged")
            with pipeline.timed(report, "scan"):
                report.verify = scan(root, report.retrained_requests)
        report.slices = params.sharding.slices
        report.checkpoints_before = {str(s): {str(k): h for k, h in v.items()} for s, v in before.items()}
        report.checkpoints_after = {str(s): {str(k): h for k, h in v.items()} for s, v in after.items()}
        if not report.full_training_tokens or kind == "run" and set(todo) == set(params.sharding.shard_ids):
            report.full_training_tokens = pipeline.full_training_tokens(ws, params)
        report.save(ws)
        if report.verify is not None:
            if report.purge and report.purge.get("remote_not_collected"):
                logger.error(
                    "the DVC remote could not be garbage-collected (see the purge notes in the run report): it may "
                    "still hold old copies, so requests stay purged, not certified; the next `sisaflow run` "
                    "purges again and certifies once the remote is reachable"
                )
            elif report.verify["findings"]:
                logger.error(
                    f"the scan after purge found {report.verify['findings']} copy(ies) of deleted records "
                    "(by location: " + json.dumps(report.verify["findings_by_location"]) + "); requests stay "
                    "purged, not certified: `sisaflow verify` shows where; once they are removed, "
                    "`sisaflow certificate <request id>` scans again and certifies"
                )
            else:
                for rid in report.retrained_requests:
                    report.certificates[rid] = certify(root, rid)
                report.save(ws)
    out = {"report": report.__dict__, "checkpoints_before": before, "checkpoints_after": after}
    out["cost_model"] = pipeline.cost_model(
        params.sharding.shards, params.sharding.slices, params.train.schedule
    )
    out["cost_model_formula"] = pipeline.cost_model_formula(params.train.schedule)
    return out
