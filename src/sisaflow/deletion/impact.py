"""Impact records: what a deletion request touches, written before a run changes anything.

`record_impact` writes, per request a run is about to apply, where the request's records sit (shard, slice) and
the hashes and sizes of the files of the checkpoints trained on them: the weights and the optimizer state (AdamW's
moments are running sums of the records' gradients, so they are a copy of the records too) (runs/impact/<id>.json,
written once: a run that finishes a killed one keeps what was true before the first touched anything).
`retired_files` reads them back as the scan looks for them, `retired_file_hashes` as the certificate states them.
Impact records written before optimizer state was recorded (no `retired_files`) name the weights only.
`unrecorded_requests` guards the import against a ledger rolled back behind its certificates or impact records.
"""

from __future__ import annotations

import json
from pathlib import Path

from sisaflow.core import ledger
from sisaflow.core.config import Params
from sisaflow.core.fsio import read_json, sha256_file, write_json
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import read_table
from sisaflow.data.sharding import load_placement
from sisaflow.scan.targets import RetiredFile
from sisaflow.training.checkpoint import MODEL_FILE, OPTIMIZER_FILE

RETIRED_KINDS = {MODEL_FILE: "weights", OPTIMIZER_FILE: "optimizer-state"}
"""The files of a checkpoint that hold what training learnt from its records, and what the scan calls a copy."""


def unrecorded_requests(ws: Workspace) -> list[str]:
    """Request ids that a certificate (reports/certificates/) or an impact record (runs/impact/, written when a
    run first took a request up, certified or not) names but the deletion ledger lacks: the ledger was rolled
    back (a `git checkout` of deletions/, a restored backup), and importing now would bring their records back."""
    named: set[str] = set()
    for directory, key in (
        (ws.certificates_dir, ("request", "request_id")),
        (ws.runs_dir / "impact", ("request_id",)),
    ):
        for path in directory.glob("*.json") if directory.is_dir() else ():
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
                for k in key:
                    value = value[k]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a certificate or an impact record
            if isinstance(value, str):
                named.add(value)
    if not named:
        return []
    return sorted(named - {r.request_id for r in ledger.read_ledger(ws.ledger_file)})


def impact_file(ws: Workspace, request_id: str) -> Path:
    return ws.runs_dir / "impact" / f"{request_id}.json"


def record_impact(
    ws: Workspace,
    params: Params,
    requests: list[ledger.DeletionRequest],
    checkpoints: dict[int, dict[int, str]],
) -> list[str]:
    """For each request without one yet, write where its records are placed and the files of the checkpoints
    that saw them (`checkpoints`: pipeline.checkpoint_hashes, the weights hashes taken before the run changes
    anything; the optimizer state's are taken here): from the first slice holding one of them on, in every shard
    that holds one. Call it before the run re-imports or re-shards. Holds shard and slice numbers and file hashes
    and sizes only, never a record's id or content hash. Returns the requests written."""
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
                "retired_files": {str(k): _checkpoint_files(ws, shard, k, h) for k, h in retired.items()},
            }
        write_json(
            impact_file(ws, req.request_id),
            {"request_id": req.request_id, "slices": params.sharding.slices, "shards": shards},
        )
        written.append(req.request_id)
    return written


def _checkpoint_files(ws: Workspace, shard: int, slice_: int, weights_hash: str) -> dict[str, dict]:
    """{file name: {"sha256", "bytes"}} of a checkpoint's weights (their hash as given) and optimizer state."""
    directory = ws.checkpoint_dir(shard, slice_)
    weights = directory / MODEL_FILE
    out = {MODEL_FILE: {"sha256": weights_hash, "bytes": weights.stat().st_size if weights.is_file() else -1}}
    optimizer = directory / OPTIMIZER_FILE
    if optimizer.is_file():
        out[OPTIMIZER_FILE] = {"sha256": sha256_file(optimizer), "bytes": optimizer.stat().st_size}
    return out


def _impact_files(shard: str, s: dict) -> dict[str, dict[str, dict]]:
    """{slice: {file name: {"sha256", "bytes"}}} of one shard of an impact record; an older record (no
    retired_files) gives the weights alone."""
    if "retired_files" in s:
        return s["retired_files"]
    sizes = s.get("retired_bytes", {})
    return {k: {MODEL_FILE: {"sha256": h, "bytes": int(sizes.get(k, -1))}} for k, h in s["retired"].items()}


def retired_files(ws: Workspace, request_ids: list[str]) -> dict[str, RetiredFile]:
    """{sha256: RetiredFile} of every weights and optimizer-state file of every checkpoint the requests retired,
    from their impact records: what the scan looks for besides the records themselves."""
    out: dict[str, RetiredFile] = {}
    for rid in request_ids:
        path = impact_file(ws, rid)
        if not path.is_file():
            continue
        for shard, s in read_json(path)["shards"].items():
            for k, files in _impact_files(shard, s).items():
                for name, f in files.items():
                    out.setdefault(
                        f["sha256"],
                        RetiredFile(
                            rid, f"shard-{shard}/slice-{k}", RETIRED_KINDS.get(name, name), int(f["bytes"])
                        ),
                    )
    return out


def retired_file_hashes(impact: dict) -> dict[str, dict[str, str]]:
    """{"shard-N/slice-K": {file name: sha256}} of an impact record, as a certificate states them."""
    return {
        f"shard-{shard}/slice-{k}": {name: f["sha256"] for name, f in sorted(files.items())}
        for shard, s in impact["shards"].items()
        for k, files in _impact_files(shard, s).items()
    }
