"""Which data and settings a checkpoint came from: chain hashes and staleness. No torch here, so the
deletion path (recording a request, deciding what to serve) stays fast to start."""

from __future__ import annotations

from sisaflow.core.fsio import digest
from sisaflow.core.paths import Workspace
from sisaflow.training.checkpoint import read_meta


def chain_hashes(identity: str, slice_digests: list[str]) -> list[str]:
    """chain[k] identifies checkpoint k: the training identity plus the data of slices 0..k."""
    chain, prev = [], identity
    for d in slice_digests:
        prev = digest((prev, d))
        chain.append(prev)
    return chain


def first_stale_slice(ws: Workspace, shard: int, chain: list[str]) -> int:
    """The first slice whose checkpoint is missing or was trained on other data or settings."""
    for k, expected in enumerate(chain):
        meta = read_meta(ws.checkpoint_dir(shard, k))
        if meta is None or meta.chain != expected:
            return k
    return len(chain)
