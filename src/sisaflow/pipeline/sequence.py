"""The sequence of a run or a forget: the order of the steps, the locking, and every decision about a request's
state. The Prefect flows run it with Prefect tasks for steps; `sisaflow run --no-prefect` / `sisaflow forget
--no-prefect` run it in this process.

    lock -> impact records -> metrics before -> prepare -> shard -> train the stale shards -> ensemble
         -> mark applied -> dvc commit -> purge -> scan -> certify

The steps are the table `steps.STEPS`; a `StepRunner` calls them by name. The flows pass a runner whose call
runs the step as its Prefect task (for retries and task-run records); everything else stays here, so both ways
of running do the same thing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sisaflow.core import ledger
from sisaflow.core.config import Params
from sisaflow.core.lock import workspace_lock
from sisaflow.core.paths import Workspace
from sisaflow.deletion import requests
from sisaflow.deletion.impact import record_impact
from sisaflow.pipeline import steps
from sisaflow.pipeline.report import RunReport, RunResult, cost_model, cost_model_formula, timed

log = logging.getLogger("sisaflow")


def _ws(root: str) -> Workspace:
    return Workspace(Path(root))


class StepRunner:
    """Runs a step of `steps.STEPS` by name, in this process; `say`, `warn` and `error` report progress."""

    orchestration = "the library, without Prefect"
    """What runs the steps, for the run report."""

    def __init__(
        self,
        say: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        error: Callable[[str], None] | None = None,
    ):
        self.say = say or log.info
        self.warn = warn or log.warning
        self.error = error or log.error

    def __call__(self, name: str, root: str, *args: Any) -> Any:
        return steps.run_step(name, root, *args, progress=self.say)


def _snapshot_before(runner: StepRunner, root: str, request_ids: list[str], run_id: str) -> str | None:
    try:
        return runner("snapshot_before", root, request_ids, run_id)
    except Exception as exc:  # measuring must never stop a deletion; the run goes on without the numbers
        runner.warn(f"before-deletion metrics not recorded ({type(exc).__name__}: {exc})")
        return None


def run_steps(root: str, kind: str, in_process: bool = False, runner: StepRunner | None = None) -> RunResult:
    """prepare -> shard -> train stale shards -> ensemble -> dvc commit, and for the requests this run finishes
    purge -> scan -> certify; returns the run report. `kind` is "run" or "forget"."""
    run = runner or StepRunner()
    ws = _ws(root)
    params = Params.load(ws.params_file)
    if params.model.base is not None:
        from sisaflow.models.pretrained import check_base

        check_base(params.model)  # a bad base fails the run before it imports, shards or trains anything
    with workspace_lock(ws, f"sisaflow {kind}", waiting=run.say):
        # made once the lock is held, so reports are named in the order runs applied their changes
        # the requests this run finishes: every one not yet certified, including any recorded while it waited
        # for the lock and any a killed run left half done
        # the ledger is read once: this run applies the requests recorded by now, and one recorded while it runs
        # (between this read and the import) waits for the next run, which records its impact first
        known = [r.request_id for r in ledger.read_ledger(ws.ledger_file)]
        report = RunReport(
            kind=kind,
            requests=[r for r in requests.open_requests(ws) if r in set(known)],
            orchestration=run.orchestration,
        )
        pending = [r for r in requests.pending_requests(ws) if r.request_id in set(known)]
        applying = [r.request_id for r in pending]
        before = steps.checkpoint_hashes(ws, params)
        # each request's shards, slices and checkpoints, before anything changes (kept if a crash comes)
        record_impact(ws, params, pending, before)
        if applying:
            with timed(report, "metrics_before"):
                _snapshot_before(run, root, applying, report.run_id)
        report.full_training_tokens = steps.full_training_tokens(ws, params)
        with timed(report, "prepare"):
            report.imported = run("prepare", root, known).to_json()
        with timed(report, "shard"):
            sharded = run("shard", root)
        report.shards_rewritten = sharded.shards_written
        report.slices_rewritten = [list(x) for x in sharded.slices_written]
        todo = run("stale", root)
        if todo:
            run.say("stale: " + ", ".join(f"shard {s} from slice {k}" for s, k in sorted(todo.items())))
            with timed(report, "train"):
                trained = run("train", root, sorted(todo), in_process)
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
            run.say("every shard is up to date: nothing to train")
        with timed(report, "ensemble"):
            report.ensemble_version = run("ensemble", root)["version"]
        # requests this run applied, then any a killed forget left retrained or purged: purge, scan, certify both
        # only the requests this run read: one recorded since has no impact record of this run
        applied = requests.mark_applied(ws, known)
        report.retrained_requests = applied + [
            r for r in requests.unfinished_requests(ws, known) if r not in applied
        ]
        lock_before = steps.lock_entries(ws)
        with timed(report, "dvc"):
            report.dvc_clean = not run("record", root, known)
        report.lock_changed = steps.changed_lock_entries(lock_before, steps.lock_entries(ws))
        after = steps.checkpoint_hashes(ws, params)
        if report.retrained_requests:
            # no copy left: old shard files and checkpoints in the DVC cache and remote, run cache, temp files
            with timed(report, "purge"):
                report.purge = run("purge", root)
            requests.mark_purged(ws, report.retrained_requests)
            with timed(report, "scan"):
                report.verify = run("scan", root, report.retrained_requests)
        report.slices = params.sharding.slices
        report.checkpoints_before = {str(s): {str(k): h for k, h in v.items()} for s, v in before.items()}
        report.checkpoints_after = {str(s): {str(k): h for k, h in v.items()} for s, v in after.items()}
        if not report.full_training_tokens or kind == "run" and set(todo) == set(params.sharding.shard_ids):
            report.full_training_tokens = steps.full_training_tokens(ws, params)
        report.save(ws)
        if report.verify is not None:
            if report.purge and report.purge.remote_not_collected:
                run.error(
                    "the DVC remote could not be garbage-collected (see the purge notes in the run report): it may "
                    "still hold old copies, so requests stay purged, not certified; the next `sisaflow run` "
                    "purges again and certifies once the remote is reachable"
                )
            elif report.verify.findings:
                run.error(
                    f"the scan after purge found {report.verify.findings} copy(ies) of deleted records "
                    "(by location: " + json.dumps(report.verify.findings_by_location) + "); requests stay "
                    "purged, not certified: `sisaflow verify` shows where; once they are removed, "
                    "`sisaflow certificate <request id>` scans again and certifies"
                )
            else:
                for rid in report.retrained_requests:
                    report.certificates[rid] = run("certify", root, rid)
                report.save(ws)
    return RunResult(
        report=report,
        checkpoints_before=before,
        checkpoints_after=after,
        cost_model=cost_model(params.sharding.shards, params.sharding.slices, params.train.schedule),
        cost_model_formula=cost_model_formula(params.train.schedule),
    )


def forget(
    root: str, request_id: str | None = None, in_process: bool = False, runner: StepRunner | None = None
) -> RunResult:
    """Finish every open deletion request (`request_id`, the one that asked, and any queued beside it)."""
    run = runner or StepRunner()
    if request_id and request_id not in requests.open_requests(_ws(root)):
        run.say(f"request {request_id} is already certified")
    return run_steps(root, "forget", in_process, run)


def drain(root: str, in_process: bool = False, runner: StepRunner | None = None) -> RunResult | None:
    """Run the forget steps if any request is not yet certified (recorded while nothing ran, or left unfinished
    by a run that was killed at any step); otherwise do nothing."""
    run = runner or StepRunner()
    if not requests.open_requests(_ws(root)):
        run.say("no pending deletion requests")
        return None
    return run_steps(root, "forget", in_process, run)
