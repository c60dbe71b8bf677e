"""Shared fixtures: a tiny model configuration, synthetic records and ready-sharded workspaces."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest

from sisaflow.core.config import Params, ShardingParams
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import Record, content_hash, to_table, write_table

TINY_RAW: dict = {
    "corpus": {
        "path": "records.jsonl",
        "format": "jsonl",
        "id_field": "id",
        "owner_field": "owner",
        "text_field": "text",
        "text_template": None,
    },
    "sharding": {"shards": 1, "slices": 3},
    "model": {
        "tokenizer": "byte",
        "hidden_size": 32,
        "layers": 2,
        "heads": 2,
        "intermediate_size": 64,
        "context_length": 96,
        "tie_embeddings": True,
    },
    "train": {
        "seed": 0,
        "schedule": "incremental",
        "epochs_per_slice": 1,
        "batch_size": 8,
        "learning_rate": 0.003,
        "warmup_steps": 2,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "threads": 1,
        "device": "cpu",
        "log_every": 1,
    },
    "ensemble": {"weights": "uniform", "combine": "mixture"},
}


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.fixture
def make_params() -> Callable[..., Params]:
    """make_params(train={"epochs_per_slice": 3}, sharding={...}) -> the tiny Params with those overrides."""

    def make(**overrides: dict) -> Params:
        return Params.from_dict(_merge(TINY_RAW, overrides))

    return make


@pytest.fixture
def tiny_params(make_params) -> Params:
    """A tiny Llama (byte tokenizer, hidden 32, 2 layers, 2 heads) that trains in well under a second per slice."""
    return make_params()


def record(record_id: str, owner: str, text: str) -> Record:
    return Record(record_id, owner, text, content_hash(record_id, text))


@pytest.fixture
def make_records() -> Callable[..., list[Record]]:
    """make_records(owners, per_owner) -> deterministic records r-<o>-<i> owned by o-<o>."""

    def make(owners: int = 4, per_owner: int = 6, prefix: str = "") -> list[Record]:
        out = []
        for o in range(owners):
            for i in range(per_owner):
                rid = f"{prefix}r-{o:02d}-{i:02d}"
                text = f"Question: what is {o} plus {i}? Answer: {o + i}, said owner {o}."
                out.append(record(rid, f"o-{o:02d}", text))
        return out

    return make


@pytest.fixture
def make_workspace(tmp_path: Path) -> Callable[..., Workspace]:
    """make_workspace(records, shards=1, slices=3, name="ws") -> a Workspace with the corpus imported and sharded."""
    from sisaflow.data.sharding import shard_corpus

    def make(records: list[Record], shards: int = 1, slices: int = 3, name: str = "ws") -> Workspace:
        ws = Workspace(tmp_path / name)
        ws.root.mkdir(parents=True, exist_ok=True)
        write_table(ws.corpus_file, to_table(records))
        shard_corpus(ws, ShardingParams(shards=shards, slices=slices))
        return ws

    return make


@pytest.fixture
def make_served(make_workspace) -> Callable[..., Workspace]:
    """make_served(records, params, name="ws") -> a workspace sharded as params say, every shard trained, the
    ensemble registered (served) and params.yaml written."""
    import yaml

    from sisaflow.inference.registry import build_registry
    from sisaflow.training.loop import train_shard

    def make(records: list[Record], params: Params, name: str = "ws") -> Workspace:
        sp = params.sharding
        ws = make_workspace(records, shards=sp.shards, slices=sp.slices, name=name)
        for shard in range(sp.shards):
            train_shard(ws, shard, params, progress=lambda m: None)
        build_registry(ws, params)
        ws.params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
        return ws

    return make


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip is a failure unless the test carries the `gpu` marker (issue 25, point 12): everything else `make
    test` needs, `make setup` and `make base` install, so a skip there hides a miss (a module, an executable, a
    case root cannot reach) behind a green run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but only a test marked `gpu` may skip: {reason}"
