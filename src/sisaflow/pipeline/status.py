"""What `sisaflow status` shows: shards, checkpoints, the served ensemble, pending deletions, and requests a
killed run left applied but not certified."""

from __future__ import annotations

from sisaflow.core import ledger
from sisaflow.core.errors import WorkspaceError
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import ImportReport, read_import_report
from sisaflow.deletion.requests import open_requests, pending_requests
from sisaflow.inference.registry import read_registry, serving_view
from sisaflow.pipeline import steps
from sisaflow.training.checkpoint import read_meta, weights_hash


def workspace_status(ws: Workspace) -> dict:
    """A JSON-able summary of the workspace."""
    params = steps.load(ws)
    shards = []
    for s in params.sharding.shard_ids:
        entry: dict = {"shard": s}
        mpath = ws.shard_manifest(s)
        if mpath.is_file():
            from sisaflow.core.fsio import read_json

            m = read_json(mpath)
            entry.update(
                records=m["records"],
                owners=m["owners"],
                slices=[x["records"] for x in sorted(m["slices"], key=lambda x: x["slice"])],
            )
        ckpts = []
        for k in range(params.sharding.slices):
            d = ws.checkpoint_dir(s, k)
            meta = read_meta(d)
            ckpts.append(weights_hash(d)[:16] if meta else None)
        entry["checkpoints"] = ckpts
        shards.append(entry)
    try:
        reg = read_registry(ws)
    except WorkspaceError:
        ensemble = None
    else:
        requested = {h for r in ledger.read_ledger(ws.ledger_file) for h in r.content_hashes}
        served, excluded = serving_view(ws, reg, params.unlearn.mode, requested)
        ensemble = {
            "version": reg["version"],
            "shards": [c["shard"] for c in reg["constituents"]],
            "served": [c["shard"] for c in served],
            "excluded": excluded,
        }
    stale = {}
    if all(ws.shard_manifest(s).is_file() for s in params.sharding.shard_ids):
        stale = steps.stale_shards(ws, params)
    state = ledger.current_state(ws.ledger_file)
    pending = [
        {
            "request_id": r.request_id,
            "owners": len(r.owners),
            "records": len(r.content_hashes),
            "state": state.get(r.request_id, "pending"),
        }
        for r in pending_requests(ws)
    ]
    # every request not yet certified: the pending ones and those a killed run left retrained or purged
    by_id = {r.request_id: r for r in ledger.read_ledger(ws.ledger_file)}
    open_ = [
        {
            "request_id": rid,
            "owners": len(by_id[rid].owners),
            "records": len(by_id[rid].content_hashes),
            "state": state.get(rid, "pending"),
        }
        for rid in open_requests(ws)
    ]
    imported = read_import_report(ws.corpus_file)
    return {
        "workspace": str(ws.root),
        "imported": imported.to_json() if imported else None,
        "shards": shards,
        "ensemble": ensemble,
        "stale": {str(k): v for k, v in stale.items()},
        "pending_deletions": pending,
        "open_requests": open_,
        "requests_by_state": {s: sum(1 for v in state.values() if v == s) for s in ledger.STATES},
    }


def format_status(st: dict) -> str:
    lines = [f"workspace {st['workspace']}"]
    if st.get("imported"):
        lines.append(ImportReport.from_json(st["imported"]).summary())
    lines.append(
        f"{'shard':>5} {'records':>8} {'owners':>7}  slices (records)      checkpoints (sha256 of weights)"
    )
    for sh in st["shards"]:
        ck = " ".join((c or "-")[:8] for c in sh["checkpoints"])
        sl = ",".join(map(str, sh.get("slices", [])))
        lines.append(
            f"{sh['shard']:>5} {sh.get('records', '-'):>8} {sh.get('owners', '-'):>7}  {sl:20s}  {ck}"
        )
    ens = st["ensemble"]
    if ens:
        line = f"ensemble: version {ens['version']}, shards {','.join(map(str, ens['shards']))}"
        if ens["excluded"]:
            line += f"; not served until retrained: shard(s) {','.join(map(str, ens['excluded']))}"
        lines.append(line)
    else:
        lines.append("ensemble: none yet")
    if st["stale"]:
        lines.append("stale: " + ", ".join(f"shard {s} from slice {k}" for s, k in st["stale"].items()))
    pend = st["pending_deletions"]
    lines.append(
        f"pending deletions: {len(pend)}"
        + "".join(
            f"\n  {p['request_id']} ({p['state']}): {p['records']} record(s) of {p['owners']} owner(s)"
            for p in pend
        )
    )
    half_done = [p for p in st.get("open_requests", []) if p["state"] in ("retrained", "purged")]
    if half_done:
        lines.append(
            f"applied but not certified: {len(half_done)} (a run stopped after retraining; "
            "`sisaflow run` finishes them)"
            + "".join(
                f"\n  {p['request_id']} ({p['state']}): {p['records']} record(s) of {p['owners']} owner(s)"
                for p in half_done
            )
        )
    counts = ", ".join(f"{k} {v}" for k, v in st["requests_by_state"].items() if v)
    lines.append(f"deletion requests: {counts or 'none'}")
    return "\n".join(lines)
