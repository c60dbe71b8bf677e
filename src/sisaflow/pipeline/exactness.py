"""`sisaflow verify --exact`: rebuild shards from the source without the deleted records, retrain them from
scratch elsewhere, and compare.

The served constituent of a shard must be bitwise equal to one trained from nothing on the corpus source minus
every record the deletion ledger names: that is what "the model after forget is the model trained without those
records" means. This re-imports the source without the ledger's records into a temporary workspace, places them
with the workspace's recorded placement (slices are fixed at first placement), retrains there (same code, same
params, in this process) and compares the sha256 of the weight files. It also says whether the rebuilt slice
files are the workspace's own, so a bug in importing or sharding shows as such. Without a readable source (a
workspace built by hand) it retrains from the workspace's slice files. On CPU the weights are equal; on CUDA they
are not expected to be.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sisaflow.core.config import Params
from sisaflow.core.errors import CorpusError, ShardingError
from sisaflow.core.paths import Workspace
from sisaflow.core.progress import meter
from sisaflow.data.sharding import read_shard_manifest, shard_corpus, slice_digests
from sisaflow.inference.registry import read_registry
from sisaflow.pipeline import steps
from sisaflow.training.checkpoint import MODEL_FILE, read_meta, weights_hash
from sisaflow.training.loop import train_shard


@dataclass(frozen=True)
class ExactResult:
    shard: int
    served: str
    """sha256 of the served constituent's weights."""
    scratch: str
    """sha256 of the weights trained from scratch on the source minus the ledger's records."""
    from_source: bool = True
    """False when the source was not readable and the workspace's slice files were used instead."""
    same_data: bool = True
    """The rebuilt slice files are the workspace's own (always true without the source)."""
    served_environments: tuple[dict[str, str], ...] = ()
    """The environments that trained the served weights (their checkpoint's meta); empty if not known."""
    environment: dict[str, str] | None = None
    """The environment of this run's training from scratch."""

    @property
    def equal(self) -> bool:
        return self.served == self.scratch

    @property
    def environment_changed(self) -> bool:
        """The served weights were trained, in whole or in part, under another environment than this run's:
        then bitwise equality is not to be expected (CPU training repeats within one environment)."""
        return bool(self.served_environments) and list(self.served_environments) != [self.environment]


def _rebuild(ws: Workspace, scratch: Workspace, params: Params) -> bool:
    """Import the source minus the ledger's records into `scratch` and place them as `ws` placed them; False
    (nothing written) when the source cannot be read."""
    if not ws.source(params.corpus.path).is_file():
        return False
    try:
        steps.prepare(ws, params, corpus_file=scratch.corpus_file)
    except CorpusError:
        return False
    scratch.shards_dir.mkdir(parents=True, exist_ok=True)
    for recorded in (ws.placement_file, ws.sharding_file):
        if recorded.is_file():
            shutil.copy2(recorded, scratch.shards_dir / recorded.name)
    shard_corpus(scratch, params.sharding, allow_empty=True)
    return True


def _slice_digests(ws: Workspace, shard: int) -> list[str] | None:
    try:
        return slice_digests(read_shard_manifest(ws, shard))
    except ShardingError:  # no manifest: the shard holds nothing there
        return None


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
        from_source = _rebuild(ws, scratch, params)
        with meter("verify --exact", len(todo), "shard") as retrained:
            for s in todo:
                if not from_source:
                    shutil.copytree(ws.shard_dir(s), scratch.shard_dir(s))
                same_data = _slice_digests(scratch, s) == _slice_digests(ws, s)
                train_shard(scratch, s, params, progress=progress or (lambda m: None))
                last = int(served[s]["checkpoint"].rsplit("slice-", 1)[1])
                served_dir = ws.root / served[s].get("served", served[s]["checkpoint"])
                scratch_dir = scratch.checkpoint_dir(s, last)
                scratch_hash = weights_hash(scratch_dir) if (scratch_dir / MODEL_FILE).is_file() else "-"
                served_hash = weights_hash(served_dir)
                trained = read_meta(ws.root / served[s]["checkpoint"])
                # the checkpoint in models/ tells, while it still holds the served weights
                history: tuple[dict[str, str], ...] = ()
                if trained is not None and weights_hash(ws.root / served[s]["checkpoint"]) == served_hash:
                    history = tuple(trained.environments)
                here = read_meta(scratch_dir)
                env = here.environments[-1] if here is not None and here.environments else None
                results.append(
                    ExactResult(s, served_hash, scratch_hash, from_source, same_data, history, env)
                )
                retrained.advance()
    return results
