"""Splitting the imported corpus into shards (by owner) and slices (fixed at first placement).

A record's shard is a stable hash of its owner, so one person's deletion touches one shard and new data never
moves existing records. Its slice is a second stable hash of its owner when first placed, recorded in
shards/placement.parquet and never recomputed; records appended later go to the last slice.

Why slice by owner and not by record id: requests name owners. With records hashed to slices, an owner with 20
records has one in slice 0 with probability 1-(3/4)^20 (99.7% at R=4), so nearly every owner deletion retrains
the whole shard and the slices buy nothing. Placing an owner's records together makes an owner deletion retrain
from that owner's slice only: the (1/S)(R+1)/(2R) of the cost model. A corpus whose owner is the record itself
gets the per-record placement of the SISA paper.
Files are rewritten only when their content changes, so untouched shards stay byte-identical.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from sisaflow.core.config import ShardingParams
from sisaflow.core.errors import ShardingError
from sisaflow.core.fsio import digest, read_json, sha256_file, write_json
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import Record, from_table, read_table, to_table, write_table

PLACEMENT_SCHEMA = pa.schema([("record_id", pa.string()), ("shard", pa.int32()), ("slice", pa.int32())])


def _bucket(kind: str, key: str, n: int) -> int:
    h = hashlib.sha256(f"sisaflow-{kind}-v1\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") % n


def shard_of(owner: str, shards: int) -> int:
    """The shard of every record of `owner`."""
    return _bucket("shard", owner, shards)


def slice_of(owner: str, slices: int) -> int:
    """The slice an owner's records get when first placed."""
    return _bucket("slice", owner, slices)


def slice_digest(content_hashes: list[str]) -> str:
    """Identity of a slice's data: a hash over its records' content hashes (order-free)."""
    return digest(sorted(content_hashes))


@dataclass(frozen=True)
class ShardReport:
    shards_written: list[int]
    slices_written: list[tuple[int, int]]
    records: int
    empty_shards: list[int]


def load_placement(ws: Workspace, params: ShardingParams) -> dict[str, tuple[int, int]]:
    """{record id: (shard, slice)} of the current layout; empty when there is none or params changed it."""
    meta = ws.sharding_file
    if not ws.placement_file.is_file() or not meta.is_file():
        return {}
    info = read_json(meta)
    if info.get("shards") != params.shards or info.get("slices") != params.slices:
        return {}  # a new layout: everything is placed afresh
    t = read_table(ws.placement_file).to_pydict()
    return {rid: (sh, sl) for rid, sh, sl in zip(t["record_id"], t["shard"], t["slice"])}


def shard_corpus(ws: Workspace, params: ShardingParams, allow_empty: bool = False) -> ShardReport:
    """Place every record of the imported corpus and write shards/<shard>/slice-<k>.parquet plus manifests.

    An empty shard is an error on a first placement (too many shards for the owners), unless deletions emptied
    it (`allow_empty`, e.g. `dvc repro` on a fresh clone of a workspace that forgot a shard's every owner)."""
    if not ws.corpus_file.is_file():
        raise ShardingError(f"{ws.corpus_file}: no imported corpus; run `sisaflow run` (or `dvc repro`)")
    records = from_table(read_table(ws.corpus_file))
    previous = load_placement(ws, params)
    if records and not any(r.record_id in previous for r in records):
        # no record kept its id (a corpus without ids, whose ids now come from the text): nothing is appended to
        # a layout that holds none of it and every slice changes anyway, so place as the first time instead of
        # putting everything in the last slice
        previous = {}
    first_time = not previous

    placed: dict[tuple[int, int], list[Record]] = defaultdict(list)
    placement: dict[str, tuple[int, int]] = {}
    for r in records:
        shard = shard_of(r.owner, params.shards)
        if r.record_id in previous and previous[r.record_id][0] == shard:
            slice_ = previous[r.record_id][1]
        elif first_time:
            slice_ = slice_of(r.owner, params.slices)
        else:
            slice_ = params.slices - 1  # appended data: the last slice, so nothing earlier is retrained
        placement[r.record_id] = (shard, slice_)
        placed[(shard, slice_)].append(r)

    shard_sizes = {s: sum(len(placed[(s, k)]) for k in range(params.slices)) for s in params.shard_ids}
    empty = [s for s, n in shard_sizes.items() if n == 0]
    if empty and first_time and not allow_empty:
        owners = len({r.owner for r in records})
        raise ShardingError(
            f"sharding.shards = {params.shards} leaves shard(s) {', '.join(map(str, empty))} empty: the corpus has "
            f"{owners} owner(s) and {len(records)} record(s); lower sharding.shards"
        )

    shards_written, slices_written = [], []
    for shard in params.shard_ids:
        manifest_path = ws.shard_manifest(shard)
        old = read_json(manifest_path) if manifest_path.is_file() else {}
        old_slices = {s["slice"]: s for s in old.get("slices", [])}
        slices_info, changed = [], False
        for k in range(params.slices):
            recs = placed[(shard, k)]
            d = slice_digest([r.content_hash for r in recs])
            path = ws.slice_file(shard, k)
            prior = old_slices.get(k)
            if (
                prior
                and prior["digest"] == d
                and path.is_file()
                and sha256_file(path) == prior["file_sha256"]
            ):
                slices_info.append(prior)
                continue
            write_table(path, to_table(recs))
            slices_info.append(
                {"slice": k, "records": len(recs), "digest": d, "file_sha256": sha256_file(path)}
            )
            slices_written.append((shard, k))
            changed = True
        for stale in ws.shard_dir(shard).glob("slice-*.parquet"):
            if int(stale.stem.split("-")[1]) >= params.slices:
                stale.unlink()
                changed = True
        manifest = {
            "shard": shard,
            "records": shard_sizes[shard],
            "owners": len({r.owner for k in range(params.slices) for r in placed[(shard, k)]}),
            "slices": slices_info,
        }
        if changed or manifest != old:
            write_json(manifest_path, manifest)
            shards_written.append(shard)

    for extra in ws.shards_dir.glob("shard-*"):
        if int(extra.name.split("-")[1]) >= params.shards:
            import shutil

            shutil.rmtree(extra)

    ordered = sorted(placement.items())
    table = pa.table(
        {
            "record_id": [rid for rid, _ in ordered],
            "shard": [p[0] for _, p in ordered],
            "slice": [p[1] for _, p in ordered],
        },
        schema=PLACEMENT_SCHEMA,
    )
    write_table(ws.placement_file, table)
    write_json(ws.sharding_file, {"shards": params.shards, "slices": params.slices})
    return ShardReport(shards_written, slices_written, len(records), empty)


def read_shard_manifest(ws: Workspace, shard: int) -> dict:
    """The manifest of one shard (records, owners, per-slice digests)."""
    path = ws.shard_manifest(shard)
    if not path.is_file():
        raise ShardingError(f"{path}: shard {shard} has no manifest; run `sisaflow shard` first")
    return read_json(path)


def slice_digests(manifest: dict) -> list[str]:
    """A shard manifest's slice digests in slice order: what a checkpoint's chain hash is built from."""
    return [s["digest"] for s in sorted(manifest["slices"], key=lambda s: s["slice"])]


def read_slice(ws: Workspace, shard: int, slice_: int) -> list[Record]:
    """The records of one slice, in canonical order."""
    return from_table(read_table(ws.slice_file(shard, slice_)))
