"""The monolithic baseline of `sisaflow evaluate`: one model trained on all current data with the constituents'
settings and total compute, in a temporary workspace that is removed afterwards."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from sisaflow.core.config import Params, ShardingParams
from sisaflow.core.paths import Workspace
from sisaflow.inference.ensemble import Ensemble


def train_baseline(
    ws: Workspace, params: Params, progress: Callable[[str], None] | None = None
) -> tuple[Ensemble, float]:
    """One model on all current data, same settings and total compute as the constituents together (same
    epochs over the same records), trained in a temporary workspace that is removed. Returns it and seconds."""
    from sisaflow.data.sharding import shard_corpus
    from sisaflow.inference.registry import build_registry
    from sisaflow.training.loop import train_shard

    mono = dataclasses.replace(params, sharding=ShardingParams(shards=1, slices=params.sharding.slices))
    with tempfile.TemporaryDirectory(prefix="sisaflow-baseline-") as tmp:
        tws = Workspace(Path(tmp))
        tws.corpus_file.parent.mkdir(parents=True, exist_ok=True)
        tws.corpus_file.write_bytes(ws.corpus_file.read_bytes())
        tws.params_file.write_text(yaml.safe_dump(mono.to_dict(), sort_keys=False))
        shard_corpus(tws, mono.sharding)
        t0 = time.perf_counter()
        train_shard(tws, 0, mono, progress=progress or (lambda m: None))
        seconds = time.perf_counter() - t0
        build_registry(tws, mono)
        return Ensemble.load(tws), seconds
