"""Proof of a deletion: gathering what a certificate states from the workspace, and issuing it.

The forget flow records, in its run report (runs/*-forget.json), the checkpoints before and after, what it
retrained, what purge removed and what the scan found. `certify` reads that report and the ledger and writes
reports/certificates/<request_id>.json and .html (signed when SISAFLOW_CERTIFICATE_KEY is set).
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
from sisaflow.errors import DeletionError
from sisaflow.paths import Workspace


def certificates_dir(ws: Workspace) -> Path:
    return ws.root / "reports" / "certificates"


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
    verify = run.get("verify") or {}
    if verify.get("findings"):
        raise DeletionError(
            f"request {request_id}: the scan after purge found {verify['findings']} copy(ies); run "
            "`sisaflow verify` to see where, remove them, then certify"
        )
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

    issued_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    states = ledger.states(ws.ledger_file).get(request_id, [])
    if not any(s["state"] == "certified" for s in states):
        states = [*states, {"state": "certified", "at": issued_at}]
    cert = build_certificate(
        request=asdict(req),
        states=states,
        content_hashes=req.content_hashes,
        affected=affected,
        retired_checkpoints=pick(run.get("checkpoints_before", {})),
        new_checkpoints=pick(run.get("checkpoints_after", {})),
        purge_report=run.get("purge"),
        verify_result=verify or None,
        code_version=code_version(),
        params_hash=params_hash(ws.params_file),
        ensemble_version=run.get("ensemble_version", ""),
        issued_at=issued_at,
    )
    key = key_from_env()
    if key:
        cert = sign(cert, key)
    paths = write_certificate(certificates_dir(ws), cert)
    ledger.mark(ws.ledger_file, [request_id], "certified")
    return paths
