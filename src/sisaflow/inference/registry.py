"""The ensemble registry: which constituent checkpoints are served together, swapped atomically.

Serving never reads models/: retraining rewrites those paths before the new version is promoted. Each served
constituent is a frozen copy, registry/constituents/<sha256 of weights>/ (the weights, hard-linked when the file
system allows, and the lineage: the content hashes of every record it was trained on). Promotion is the atomic
write of registry/ensemble.json naming the new copies; the copies no version names any more are removed then.

registry/ensemble.json names, per shard, the checkpoint after its last slice, the sha256 of its weights and its
record count. Its version is a digest of that content, so the same constituents always make the same version.
For LoRA constituents (model.base set) the weights are the adapters', and `base_sha256` names the base they
were trained over; the base itself is loaded once at serving time and shared by all adapters.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sisaflow.core.config import Params
from sisaflow.core.errors import WorkspaceError
from sisaflow.core.fsio import atomic_dir, digest, read_json, write_json
from sisaflow.core.paths import Workspace
from sisaflow.data.sharding import read_shard_manifest, slice_digests
from sisaflow.training.checkpoint import LINEAGE_FILE, MODEL_FILE, read_lineage, read_meta, weights_hash
from sisaflow.training.lineage import chain_hashes


@dataclass(frozen=True)
class Constituent:
    shard: int
    checkpoint: str
    """Where it was trained, relative to the workspace: models/shard-<n>/slice-<k>."""
    weights_sha256: str
    records: int
    served: str
    """The frozen copy that is served, relative to the workspace: registry/constituents/<sha256>."""


def _freeze(ws: Workspace, shard: int, last: int, sha: str) -> Path:
    """registry/constituents/<sha>/ with the weights and the lineage; written once, never changed."""
    target = ws.registry_dir / "constituents" / sha
    if (target / MODEL_FILE).is_file() and (target / LINEAGE_FILE).is_file():
        return target
    with atomic_dir(target) as tmp:
        src = ws.checkpoint_dir(shard, last) / MODEL_FILE
        try:
            os.link(src, tmp / MODEL_FILE)
        except OSError:
            shutil.copy2(src, tmp / MODEL_FILE)
        write_json(tmp / LINEAGE_FILE, sorted(constituent_lineage(ws, shard, last)))
    return target


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
        digests = slice_digests(manifest)
        if meta is None or meta.chain != chain_hashes(params.training_identity(), digests)[-1]:
            raise WorkspaceError(
                f"shard {shard} is not trained on its current data; run `sisaflow train --shard {shard}`"
            )
        sha = weights_hash(ckpt)
        frozen = _freeze(ws, shard, last, sha)
        constituents.append(
            Constituent(
                shard,
                str(ckpt.relative_to(ws.root)),
                sha,
                manifest["records"],
                str(frozen.relative_to(ws.root)),
            ).__dict__
        )
    # no constituent at all (every record deleted) is still a version: an empty one, which serves nothing
    body: dict[str, Any] = {
        "constituents": constituents,
        "weights": params.ensemble.weights,
        "combine": params.ensemble.combine,
        "tokenizer": params.model.tokenizer,
        "model": dataclasses.asdict(params.model),
    }
    if params.ensemble.combine == "posterior":  # other combinations keep the versions they had
        body["posterior"] = dataclasses.asdict(params.ensemble.posterior)
    if params.model.base is not None:
        from sisaflow.core.base_files import base_identity

        # the adapters are only the served model over this exact base; Ensemble.load checks it is unchanged
        body["base_sha256"] = base_identity(params.model.base)
    body["version"] = digest([repr(sorted(body.items()))])[:12]
    write_json(ws.registry_file, body)  # the promotion: one atomic rename
    named = {Path(c["served"]).name for c in constituents}
    (ws.registry_dir / "constituents").mkdir(parents=True, exist_ok=True)
    for old in (ws.registry_dir / "constituents").iterdir():
        if old.name not in named:  # superseded copies, possibly trained on deleted records
            shutil.rmtree(old, ignore_errors=True)
    return body


def constituent_lineage(ws: Workspace, shard: int, last_slice: int) -> set[str]:
    """Content hashes of every record the constituent after `last_slice` was trained on."""
    out: set[str] = set()
    for k in range(last_slice + 1):
        out.update(read_lineage(ws.checkpoint_dir(shard, k)))
    return out


def constituent_lineage_served(ws: Workspace, c: dict) -> set[str]:
    """The lineage of a served constituent, from its frozen copy (models/ may be mid-retraining)."""
    if c.get("served"):
        return set(read_json(ws.root / c["served"] / LINEAGE_FILE))
    last = int(c["checkpoint"].rsplit("slice-", 1)[1])
    return constituent_lineage(ws, c["shard"], last)


def serving_view(
    ws: Workspace, reg: dict, mode: str, requested_hashes: set[str]
) -> tuple[list[dict], list[int]]:
    """(constituents to serve, shards excluded). In `exclude` mode a constituent whose lineage holds a
    requested record's content hash is not served until its retrained version is promoted."""
    if mode != "exclude" or not requested_hashes:
        return list(reg["constituents"]), []
    kept, dropped = [], []
    for c in reg["constituents"]:
        if constituent_lineage_served(ws, c) & requested_hashes:
            dropped.append(c["shard"])
        else:
            kept.append(c)
    return kept, dropped


def read_registry(ws: Workspace) -> dict:
    """The served ensemble version."""
    if not ws.registry_file.is_file():
        raise WorkspaceError(f"{ws.registry_file}: no ensemble yet; run `sisaflow run` first")
    return read_json(ws.registry_file)
