"""Proof of a deletion: gathering what a certificate states from the workspace, and issuing it.

Before a run changes anything, `record_impact` writes, per request it is about to apply, where the request's
records sit (shard, slice) and the weights hashes of the checkpoints trained on them (runs/impact/<id>.json,
written once: a run that finishes a killed one keeps what was true before the first touched anything). The run
report (runs/*-forget.json) holds the checkpoints after, what purge removed and what the scan found. `certify`
reads both and the ledger and writes reports/certificates/<request_id>.json and .html (signed when
SISAFLOW_CERTIFICATE_KEY is set). Each certificate names its own request's shards and checkpoints, also when
one run applied several requests or finished one a crash interrupted.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from sisaflow import ledger
from sisaflow.certificate import (
    build_certificate,
    code_version,
    key_from_env,
    params_hash,
    sign,
    write_certificate,
)
from sisaflow.checkpoint import MODEL_FILE
from sisaflow.config import Params
from sisaflow.corpus import read_table
from sisaflow.errors import DeletionError
from sisaflow.fsio import read_json, write_json
from sisaflow.paths import Workspace
from sisaflow.sharding import load_placement


def certificates_dir(ws: Workspace) -> Path:
    return ws.certificates_dir


def certified_but_unrecorded(ws: Workspace) -> list[str]:
    """Request ids that reports/certificates/ certifies but the deletion ledger lacks: the ledger was rolled back
    (a `git checkout` of deletions/, a restored backup), and importing now would bring their records back."""
    directory = certificates_dir(ws)
    if not directory.is_dir():
        return []
    recorded = {r.request_id for r in ledger.read_ledger(ws.ledger_file)}
    missing = set()
    for path in directory.glob("*.json"):
        try:
            rid = json.loads(path.read_text(encoding="utf-8"))["request"]["request_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a certificate
        if isinstance(rid, str) and rid not in recorded:
            missing.add(rid)
    return sorted(missing)


def impact_file(ws: Workspace, request_id: str) -> Path:
    return ws.runs_dir / "impact" / f"{request_id}.json"


def record_impact(
    ws: Workspace,
    params: Params,
    requests: list[ledger.DeletionRequest],
    checkpoints: dict[int, dict[int, str]],
) -> list[str]:
    """For each request without one yet, write where its records are placed and the hashes of the checkpoints
    that saw them (`checkpoints`: pipeline.checkpoint_hashes, taken before the run changes anything): from the
    first slice holding one of them on, in every shard that holds one. Call it before the run re-imports or
    re-shards. Holds shard and slice numbers and weights hashes only, never a record's id or content hash.
    Returns the requests written."""
    todo = [r for r in requests if not impact_file(ws, r.request_id).is_file()]
    placement = load_placement(ws, params.sharding) if todo else {}
    if not placement or not ws.corpus_file.is_file():
        return []  # nothing placed yet (or a new layout): certify falls back to what the run retrained
    corpus = read_table(ws.corpus_file).select(["record_id", "content_hash"]).to_pydict()
    ids_of: dict[str, list[str]] = {}
    for rid, h in zip(corpus["record_id"], corpus["content_hash"]):
        ids_of.setdefault(h, []).append(rid)
    written = []
    for req in todo:
        held: dict[int, set[int]] = {}
        for rid in (rid for h in req.content_hashes for rid in ids_of.get(h, ())):
            if rid in placement:
                shard, slice_ = placement[rid]
                held.setdefault(shard, set()).add(slice_)
        if not held:
            continue
        shards = {}
        for shard, slices in sorted(held.items()):
            first = min(slices)
            retired = {k: h for k, h in checkpoints.get(shard, {}).items() if k >= first}
            shards[str(shard)] = {
                "holding": sorted(slices),
                "from_slice": first,
                "retired": {str(k): h for k, h in retired.items()},
                "retired_bytes": {
                    str(k): (ws.checkpoint_dir(shard, k) / MODEL_FILE).stat().st_size for k in retired
                },
            }
        write_json(
            impact_file(ws, req.request_id),
            {"request_id": req.request_id, "slices": params.sharding.slices, "shards": shards},
        )
        written.append(req.request_id)
    return written


def retired_weights(ws: Workspace, request_ids: list[str]) -> dict[str, tuple[str, str, int]]:
    """{sha256 of weights: (request id, checkpoint name, bytes)} of every checkpoint the requests retired, from
    their impact records: what the scan looks for besides the records themselves."""
    out: dict[str, tuple[str, str, int]] = {}
    for rid in request_ids:
        path = impact_file(ws, rid)
        if not path.is_file():
            continue
        for shard, s in read_json(path)["shards"].items():
            for k, h in s["retired"].items():
                out.setdefault(
                    h, (rid, f"shard-{shard}/slice-{k}", int(s.get("retired_bytes", {}).get(k, -1)))
                )
    return out


def _impact(ws: Workspace, request_id: str, run: dict) -> tuple[list[dict], dict, dict] | None:
    """(affected, retired, new) of one request from its impact record and the run that finished it."""
    path = impact_file(ws, request_id)
    if not path.is_file():
        return None
    impact = read_json(path)
    after = run.get("checkpoints_after", {})
    affected, retired, new = [], {}, {}
    for shard, s in impact["shards"].items():
        first = s["from_slice"]
        affected.append(
            {"shard": int(shard), "from_slice": first, "slices": list(range(first, impact["slices"]))}
        )
        retired.update({f"shard-{shard}/slice-{k}": h for k, h in s["retired"].items()})
        new.update(
            {f"shard-{shard}/slice-{k}": h for k, h in after.get(shard, {}).items() if int(k) >= first}
        )
    return affected, retired, new


def _run_that_applied(ws: Workspace, request_id: str) -> dict:
    for path in sorted(ws.runs_dir.glob("*.json"), reverse=True):
        try:
            rep = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if request_id in rep.get("retrained_requests", []):
            return rep
    raise DeletionError(f"request {request_id}: no run report says which run applied it (runs/ was cleared?)")


def certify(ws: Workspace, request_id: str) -> tuple[Path, Path]:
    """Write the certificate of an applied request and mark it certified. Refuses a request not yet purged
    or whose post-deletion scan found a copy."""
    requests = {r.request_id: r for r in ledger.read_ledger(ws.ledger_file)}
    if request_id not in requests:
        raise DeletionError(f"unknown request id {request_id!r}; `sisaflow requests` lists them")
    req = requests[request_id]
    state = ledger.current_state(ws.ledger_file).get(request_id, "pending")
    if ledger.STATES.index(state) < ledger.STATES.index("purged"):
        raise DeletionError(f"request {request_id} is {state}: it is certified once retrained and purged")
    run = _run_that_applied(ws, request_id)
    if (run.get("purge") or {}).get("remote_not_collected"):
        raise DeletionError(
            f"request {request_id}: the DVC remote could not be garbage-collected when it was purged, so it may "
            "still hold old copies; `sisaflow run` purges again (and certifies) once the remote is reachable"
        )
    verify = run.get("verify") or {}
    if verify.get("findings"):
        # the copies the run's scan found may have been removed since: scan again, and certify only if clean
        from sisaflow.verify import scan_summary

        verify = scan_summary(ws, Params.load(ws.params_file), [request_id])
        if verify["findings"]:
            raise DeletionError(
                f"request {request_id}: {verify['findings']} copy(ies) of its records are still on disk; "
                f"`sisaflow verify --request {request_id}` shows where; remove them, then run "
                f"`sisaflow certificate {request_id}` again"
            )
    affected, retired, new = _impact(ws, request_id, run) or _trained_by(run)
    trained = run.get("trained", {})
    environments = {
        f"shard-{a['shard']}": trained[str(a["shard"])]["environments"]
        for a in affected
        if trained.get(str(a["shard"]), {}).get("environments")
    }

    issued_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    states = ledger.states(ws.ledger_file).get(request_id, [])
    if not any(s["state"] == "certified" for s in states):
        states = [*states, {"state": "certified", "at": issued_at}]
    cert = build_certificate(
        request=asdict(req),
        states=states,
        content_hashes=req.content_hashes,
        affected=affected,
        retired_checkpoints=retired,
        new_checkpoints=new,
        purge_report=run.get("purge"),
        verify_result=verify or None,
        code_version=code_version(),
        params_hash=params_hash(ws.params_file),
        ensemble_version=run.get("ensemble_version", ""),
        issued_at=issued_at,
        training_environments=environments,
    )
    key = key_from_env()
    if key:
        cert = sign(cert, key)
    paths = write_certificate(certificates_dir(ws), cert)
    ledger.mark(ws.ledger_file, [request_id], "certified")
    return paths


def _trained_by(run: dict) -> tuple[list[dict], dict, dict]:
    """(affected, retired, new) as everything the run retrained: for a request without an impact record (one
    applied before impact records existed, or under a new shard layout)."""
    trained = {int(k): v for k, v in run.get("trained", {}).items()}
    slices = run.get("slices", 0)
    affected = [
        {"shard": s, "from_slice": t["from_slice"], "slices": list(range(t["from_slice"], slices))}
        for s, t in sorted(trained.items())
    ]

    def pick(hashes: dict) -> dict[str, str]:
        out = {}
        for shard, by_slice in hashes.items():
            if int(shard) in trained:
                for k, h in by_slice.items():
                    if int(k) >= trained[int(shard)]["from_slice"]:
                        out[f"shard-{shard}/slice-{k}"] = h
        return out

    return affected, pick(run.get("checkpoints_before", {})), pick(run.get("checkpoints_after", {}))
