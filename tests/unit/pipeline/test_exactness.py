"""verify --exact: equal for an honestly trained shard, different when the served weights were changed."""

from __future__ import annotations

import dataclasses

import torch
import yaml
from safetensors.torch import load_file, save_file

from sisaflow.core.config import Params, ShardingParams
from sisaflow.inference.registry import build_registry
from sisaflow.pipeline.exactness import verify_exact
from sisaflow.training.loop import train_shard


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

    reg = build_registry(ws, params)
    weights = (
        ws.root / next(c["served"] for c in reg["constituents"] if c["shard"] == 1) / "model.safetensors"
    )
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.finfo(tensors[name].dtype).eps  # the smallest change
    save_file(tensors, str(weights))
    by_shard = {r.shard: r.equal for r in verify_exact(ws, params)}
    assert by_shard == {0: True, 1: False}


def test_a_difference_names_the_environments_that_trained_the_served_weights(
    make_workspace, make_records, tiny_params, capsys
):
    from sisaflow import cli
    from sisaflow.core.fsio import read_json, write_json
    from sisaflow.training.checkpoint import META_FILE

    params = Params.from_dict(
        {**tiny_params.to_dict(), "sharding": dataclasses.asdict(ShardingParams(shards=1, slices=2))}
    )
    ws = make_workspace(make_records(owners=3, per_owner=3), shards=1, slices=2)
    ws.params_file.write_text(yaml.safe_dump(params.to_dict()))
    train_shard(ws, 0, params, progress=lambda m: None)
    build_registry(ws, params)
    (result,) = verify_exact(ws, params)
    assert result.equal and not result.environment_changed
    assert list(result.served_environments) == [result.environment]

    meta = ws.checkpoint_dir(0, 1) / META_FILE
    other = {**result.environment, "torch": "2.0.0"}
    write_json(meta, {**read_json(meta), "environments": [other, result.environment]})
    (result,) = verify_exact(ws, params)
    assert result.equal and result.environment_changed  # equal all the same: the note is for differences
    weights = ws.checkpoint_dir(0, 1) / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.finfo(tensors[name].dtype).eps
    save_file(tensors, str(weights))
    build_registry(ws, params)
    capsys.readouterr()
    assert cli.main(["--workspace", str(ws.root), "verify", "--exact"]) == 1
    out = capsys.readouterr().out
    assert "shard 0: DIFFERENT" in out and "torch 2.0.0" in out and "within one environment only" in out


def test_served_copy_survives_retraining_in_models(make_workspace, make_records, tiny_params):
    """Serving reads a frozen copy: rewriting models/ (as a retrain does before promotion) changes nothing
    served, and promotion removes the superseded copy."""
    import shutil

    from sisaflow.inference.ensemble import Ensemble

    params = Params.from_dict(
        {**tiny_params.to_dict(), "sharding": dataclasses.asdict(ShardingParams(shards=1, slices=2))}
    )
    ws = make_workspace(make_records(owners=3, per_owner=3), shards=1, slices=2)
    train_shard(ws, 0, params, progress=lambda m: None)
    reg = build_registry(ws, params)
    served = ws.root / reg["constituents"][0]["served"]
    before = (served / "model.safetensors").read_bytes()
    shutil.rmtree(ws.model_dir(0))  # what train_shard does to stale checkpoints before retraining
    assert (served / "model.safetensors").read_bytes() == before
    ws.params_file.write_text("")  # Ensemble.load reads unlearn.mode from params; defaults are fine
    assert Ensemble.load(ws).shards == [0]
    params2 = Params.from_dict({**params.to_dict(), "train": {**params.to_dict()["train"], "seed": 1}})
    train_shard(ws, 0, params2, progress=lambda m: None)
    reg2 = build_registry(ws, params2)
    assert reg2["constituents"][0]["served"] != reg["constituents"][0]["served"]
    assert not served.exists()
