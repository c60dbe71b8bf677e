"""The ensemble registry: which constituent checkpoints are served together, swapped atomically.

registry/ensemble.json names, per shard, the checkpoint after its last slice, the sha256 of its weights and its
record count. Its version is a digest of that content, so the same constituents always make the same version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sisaflow.checkpoint import read_lineage, read_meta, weights_hash
from sisaflow.config import Params
from sisaflow.errors import WorkspaceError
from sisaflow.fsio import digest, read_json, write_json
from sisaflow.lineage import chain_hashes
from sisaflow.paths import Workspace
from sisaflow.sharding import read_shard_manifest


@dataclass(frozen=True)
class Constituent:
    shard: int
    checkpoint: str
    """Relative to the workspace: models/shard-<n>/slice-<k>."""
    weights_sha256: str
    records: int


def build_registry(ws: Workspace, params: Params) -> dict:
    """Record the current constituents as the served ensemble version; fail if any shard is not trained."""
    constituents = []
    last = params.sharding.slices - 1
    for shard in params.sharding.shard_ids:
        manifest = read_shard_manifest(ws, shard)
        if manifest["records"] == 0:
            continue  # a shard whose records were all deleted leaves the ensemble
        ckpt = ws.checkpoint_dir(shard, last)
        meta = read_meta(ckpt)
        digests = [s["digest"] for s in sorted(manifest["slices"], key=lambda s: s["slice"])]
        if meta is None or meta.chain != chain_hashes(params.training_identity(), digests)[-1]:
            raise WorkspaceError(
                f"shard {shard} is not trained on its current data; run `sisaflow train --shard {shard}`"
            )
        constituents.append(
            Constituent(
                shard, str(ckpt.relative_to(ws.root)), weights_hash(ckpt), manifest["records"]
            ).__dict__
        )
    if not constituents:
        raise WorkspaceError("no shard holds any record: there is no ensemble to serve")
    body: dict[str, Any] = {
        "constituents": constituents,
        "weights": params.ensemble.weights,
        "combine": params.ensemble.combine,
        "tokenizer": params.model.tokenizer,
        "model": params.model.__dict__,
    }
    body["version"] = digest([repr(sorted(body.items()))])[:12]
    write_json(ws.registry_file, body)
    return body


def constituent_lineage(ws: Workspace, shard: int, last_slice: int) -> set[str]:
    """Content hashes of every record the constituent after `last_slice` was trained on."""
    out: set[str] = set()
    for k in range(last_slice + 1):
        out.update(read_lineage(ws.checkpoint_dir(shard, k)))
    return out


def serving_view(
    ws: Workspace, reg: dict, mode: str, requested_hashes: set[str]
) -> tuple[list[dict], list[int]]:
    """(constituents to serve, shards excluded). In `exclude` mode a constituent whose lineage holds a
    requested record's content hash is not served until its retrained version is promoted."""
    if mode != "exclude" or not requested_hashes:
        return list(reg["constituents"]), []
    kept, dropped = [], []
    for c in reg["constituents"]:
        last = int(c["checkpoint"].rsplit("slice-", 1)[1])
        if constituent_lineage(ws, c["shard"], last) & requested_hashes:
            dropped.append(c["shard"])
        else:
            kept.append(c)
    return kept, dropped


def read_registry(ws: Workspace) -> dict:
    """The served ensemble version."""
    if not ws.registry_file.is_file():
        raise WorkspaceError(f"{ws.registry_file}: no ensemble yet; run `sisaflow run` first")
    return read_json(ws.registry_file)
