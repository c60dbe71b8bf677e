"""The sequence of a run or a forget, as library code: what the Prefect flows run, and what `sisaflow run
--no-prefect` / `sisaflow forget --no-prefect` run without Prefect.

    lock -> impact records -> metrics before -> prepare -> shard -> train the stale shards -> ensemble
         -> mark applied -> dvc commit -> purge -> scan -> certify

Each step is a method of `Steps`, which calls the library directly. The flows (flows/steps.py) pass a subclass
whose methods run the same library code as Prefect tasks, for retries and task-run records; the order, the
locking and every decision about a request's state stay here, so both ways of running do the same thing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from sisaflow import ledger, pipeline
from sisaflow.paths import Workspace
from sisaflow.proof import record_impact

log = logging.getLogger("sisaflow")


def _ws(root: str) -> Workspace:
    return Workspace(Path(root))


class Steps:
    """The steps of a run, each a call on the workspace at `root`; `say`, `warn` and `error` report progress."""

    def __init__(
        self,
        say: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        error: Callable[[str], None] | None = None,
    ):
        self.say = say or log.info
        self.warn = warn or log.warning
        self.error = error or log.error

    @property
    def orchestration(self) -> str:
        """What runs the steps, for the run report."""
        return "the library, without Prefect"

    def prepare(self, root: str) -> dict:
        ws = _ws(root)
        return pipeline.prepare(ws, pipeline.load(ws))

    def shard(self, root: str) -> dict:
        ws = _ws(root)
        rep = pipeline.shard(ws, pipeline.load(ws))
        return {
            "shards": rep.shards_written,
            "slices": [list(x) for x in rep.slices_written],
            "records": rep.records,
        }

    def stale(self, root: str) -> dict[int, int]:
        ws = _ws(root)
        return pipeline.stale_shards(ws, pipeline.load(ws))

    def train(self, root: str, shards: list[int], in_process: bool = False):
        """Resumes from the last complete checkpoint, so a retry continues where a failure stopped."""
        ws = _ws(root)
        return pipeline.train(ws, pipeline.load(ws), shards, progress=self.say, in_process=in_process)

    def ensemble(self, root: str) -> dict:
        ws = _ws(root)
        return pipeline.ensemble(ws, pipeline.load(ws))

    def purge(self, root: str) -> dict:
        from sisaflow.purge import purge as purge_workspace

        ws = _ws(root)
        return purge_workspace(ws, pipeline.load(ws)).to_dict()

    def scan(self, root: str, request_ids: list[str]) -> dict:
        from sisaflow.verify import scan_summary

        ws = _ws(root)
        return scan_summary(ws, pipeline.load(ws), request_ids)

    def certify(self, root: str, request_id: str) -> list[str]:
        from sisaflow.proof import certify as write_certificate

        return [str(p) for p in write_certificate(_ws(root), request_id)]

    def snapshot_before(self, root: str, request_ids: list[str], run_id: str) -> str | None:
        """Aggregates of the to-be-forgotten records under the ensemble trained on them (reports/before/)."""
        from sisaflow.evaluation import snapshot_before as snapshot

        ws = _ws(root)
        try:
            path = snapshot(ws, pipeline.load(ws), request_ids, run_id)
        except Exception as exc:  # measuring must never stop a deletion; the run goes on without the numbers
            self.warn(f"before-deletion metrics not recorded ({type(exc).__name__}: {exc})")
            return None
        return str(path) if path else None

    def record(self, root: str) -> dict:
        ws = _ws(root)
        return pipeline.record(ws, pipeline.load(ws))


def run_steps(root: str, kind: str, in_process: bool = False, steps: Steps | None = None) -> dict:
    """prepare -> shard -> train stale shards -> ensemble -> dvc commit, and for the requests this run finishes
    purge -> scan -> certify; returns the run report as a dict. `kind` is "run" or "forget"."""
    steps = steps or Steps()
    ws = _ws(root)
    params = pipeline.load(ws)
    if params.model.base is not None:
        from sisaflow.pretrained import check_base

        check_base(params.model)  # a bad base fails the run before it imports, shards or trains anything
    with pipeline.workspace_lock(ws, f"sisaflow {kind}", waiting=steps.say):
        # made once the lock is held, so reports are named in the order runs applied their changes
        # the requests this run finishes: every one not yet certified, including any recorded while it waited
        # for the lock and any a killed run left half done
        report = pipeline.RunReport(
            kind=kind, requests=pipeline.open_requests(ws), orchestration=steps.orchestration
        )
        pending = pipeline.pending_requests(ws)
        applying = [r.request_id for r in pending]
        before = pipeline.checkpoint_hashes(ws, params)
        # each request's shards, slices and checkpoints, before anything changes (kept if a crash comes)
        record_impact(ws, params, pending, before)
        if applying:
            with pipeline.timed(report, "metrics_before"):
                steps.snapshot_before(root, applying, report.run_id)
        report.full_training_tokens = pipeline.full_training_tokens(ws, params)
        with pipeline.timed(report, "prepare"):
            report.imported = steps.prepare(root)
        with pipeline.timed(report, "shard"):
            sharded = steps.shard(root)
        report.shards_rewritten = sharded["shards"]
        report.slices_rewritten = sharded["slices"]
        todo = steps.stale(root)
        if todo:
            steps.say("stale: " + ", ".join(f"shard {s} from slice {k}" for s, k in sorted(todo.items())))
            with pipeline.timed(report, "train"):
                trained = steps.train(root, sorted(todo), in_process)
            report.seconds["ray_start"] = trained.ray_start_seconds
            for r in trained.shards:
                report.trained[r.shard] = {
                    "from_slice": r.start_slice,
                    "tokens": r.tokens,
                    "seconds": r.seconds,
                    "environments": r.environments,
                }
            report.training_tokens = sum(r.tokens for r in trained.shards)
        else:
            steps.say("every shard is up to date: nothing to train")
        with pipeline.timed(report, "ensemble"):
            report.ensemble_version = steps.ensemble(root)["version"]
        # requests this run applied, then any a killed forget left retrained or purged: purge, scan, certify both
        applied = pipeline.mark_applied(ws)
        report.retrained_requests = applied + [
            r for r in pipeline.unfinished_requests(ws) if r not in applied
        ]
        lock_before = pipeline.lock_entries(ws)
        with pipeline.timed(report, "dvc"):
            report.dvc_clean = not steps.record(root)
        report.lock_changed = pipeline.changed_lock_entries(lock_before, pipeline.lock_entries(ws))
        after = pipeline.checkpoint_hashes(ws, params)
        if report.retrained_requests:
            # no copy left: old shard files and checkpoints in the DVC cache and remote, run cache, temp files
            with pipeline.timed(report, "purge"):
                report.purge = steps.purge(root)
            ledger.mark(ws.ledger_file, report.retrained_requests, "purged")
            with pipeline.timed(report, "scan"):
                report.verify = steps.scan(root, report.retrained_requests)
        report.slices = params.sharding.slices
        report.checkpoints_before = {str(s): {str(k): h for k, h in v.items()} for s, v in before.items()}
        report.checkpoints_after = {str(s): {str(k): h for k, h in v.items()} for s, v in after.items()}
        if not report.full_training_tokens or kind == "run" and set(todo) == set(params.sharding.shard_ids):
            report.full_training_tokens = pipeline.full_training_tokens(ws, params)
        report.save(ws)
        if report.verify is not None:
            if report.purge and report.purge.get("remote_not_collected"):
                steps.error(
                    "the DVC remote could not be garbage-collected (see the purge notes in the run report): it may "
                    "still hold old copies, so requests stay purged, not certified; the next `sisaflow run` "
                    "purges again and certifies once the remote is reachable"
                )
            elif report.verify["findings"]:
                steps.error(
                    f"the scan after purge found {report.verify['findings']} copy(ies) of deleted records "
                    "(by location: " + json.dumps(report.verify["findings_by_location"]) + "); requests stay "
                    "purged, not certified: `sisaflow verify` shows where; once they are removed, "
                    "`sisaflow certificate <request id>` scans again and certifies"
                )
            else:
                for rid in report.retrained_requests:
                    report.certificates[rid] = steps.certify(root, rid)
                report.save(ws)
    out = {"report": report.__dict__, "checkpoints_before": before, "checkpoints_after": after}
    out["cost_model"] = pipeline.cost_model(
        params.sharding.shards, params.sharding.slices, params.train.schedule
    )
    out["cost_model_formula"] = pipeline.cost_model_formula(params.train.schedule)
    return out


def forget(
    root: str, request_id: str | None = None, in_process: bool = False, steps: Steps | None = None
) -> dict:
    """Finish every open deletion request (`request_id`, the one that asked, and any queued beside it)."""
    steps = steps or Steps()
    if request_id and request_id not in pipeline.open_requests(_ws(root)):
        steps.say(f"request {request_id} is already certified")
    return run_steps(root, "forget", in_process, steps)


def drain(root: str, in_process: bool = False, steps: Steps | None = None) -> dict:
    """Run the forget steps if any request is not yet certified (recorded while nothing ran, or left unfinished
    by a run that was killed at any step); otherwise do nothing."""
    steps = steps or Steps()
    if not pipeline.open_requests(_ws(root)):
        steps.say("no pending deletion requests")
        return {"requests": []}
    return run_steps(root, "forget", in_process, steps)
