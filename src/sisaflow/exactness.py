"""`sisaflow verify --exact`: retrain shards from scratch on their current data, elsewhere, and compare.

The served constituent of a shard must be bitwise equal to one trained from nothing on the shard's current slice
files: that is what "the model after forget is the model trained without those records" means. This retrains in
a temporary workspace (same code, same params, in this process) and compares the sha256 of the weight files.
On CPU they are equal; on CUDA they are not expected to be.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sisaflow.checkpoint import weights_hash
from sisaflow.config import Params
from sisaflow.paths import Workspace
from sisaflow.registry import read_registry
from sisaflow.training import train_shard


@dataclass(frozen=True)
class ExactResult:
    shard: int
    served: str
    """sha256 of the served constituent's weights."""
    scratch: str
    """sha256 of the weights trained from scratch on the shard's current data."""

    @property
    def equal(self) -> bool:
        return self.served == self.scratch


def verify_exact(
    ws: Workspace,
    params: Params,
    shards: list[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[ExactResult]:
    """Retrain `shards` (default: every served one) from scratch in a temporary place and compare bitwise."""
    reg = read_registry(ws)
    served = {c["shard"]: c for c in reg["constituents"]}
    todo = sorted(served) if shards is None else [s for s in shards if s in served]
    results = []
    with tempfile.TemporaryDirectory(prefix="sisaflow-exact-") as tmp:
        scratch = Workspace(Path(tmp))
        for s in todo:
            shutil.copytree(ws.shard_dir(s), scratch.shard_dir(s))
            train_shard(scratch, s, params, progress=progress or (lambda m: None))
            last = int(served[s]["checkpoint"].rsplit("slice-", 1)[1])
            served_dir = ws.root / served[s].get("served", served[s]["checkpoint"])
            results.append(
                ExactResult(s, weights_hash(served_dir), weights_hash(scratch.checkpoint_dir(s, last)))
            )
    return results
