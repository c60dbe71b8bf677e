"""verify --exact: equal for an honestly trained shard, different when the served weights were changed."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file, save_file

from sisaflow.config import Params, ShardingParams
from sisaflow.exactness import verify_exact
from sisaflow.registry import build_registry
from sisaflow.training import train_shard


def test_equal_then_different_after_tampering(make_workspace, make_records, tiny_params):
    params = Params.from_dict(
        {**tiny_params.to_dict(), "sharding": dataclasses.asdict(ShardingParams(shards=2, slices=2))}
    )
    ws = make_workspace(make_records(owners=4, per_owner=3), shards=2, slices=2)
    for s in (0, 1):
        train_shard(ws, s, params, progress=lambda m: None)
    build_registry(ws, params)
    results = verify_exact(ws, params)
    assert [r.shard for r in results] == [0, 1] and all(r.equal for r in results)

    weights = ws.checkpoint_dir(1, 1) / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.finfo(tensors[name].dtype).eps  # the smallest change
    save_file(tensors, str(weights))
    by_shard = {r.shard: r.equal for r in verify_exact(ws, params)}
    assert by_shard == {0: True, 1: False}
