"""Exactness on the real base: LoRA adapters over SmolLM2-135M-Instruct as `make base` converts it. Retraining a
shard after a deletion gives bitwise the adapter (and optimizer state, counters, lineage) of training from scratch
without the deleted records, on CPU. `make test` runs `make base` first; pytest alone needs it done (or
SISAFLOW_BASE_DIR naming a converted directory).

Small on purpose (6 owners x 2 records, two slices, two epochs): a step on two threads is about a second, so the
three trainings take well under a minute; the base's 30 layers and 49,152-token vocabulary are what is tested."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BASE = Path(os.environ.get("SISAFLOW_BASE_DIR") or REPO / "bases" / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from sisaflow.models.base_setup import converted

    if not converted(BASE):
        pytest.fail(f"{BASE} is not a converted SmolLM2 base: run `make base` (or set SISAFLOW_BASE_DIR)")
    return BASE


def _files(ws, shard: int, slices: int) -> dict:
    return {
        (k, f.name): f.read_bytes()
        for k in range(slices)
        for f in sorted(ws.checkpoint_dir(shard, k).iterdir())
    }


def test_a_forget_over_smollm2_equals_training_without_the_records(
    smollm2, make_workspace, make_params, make_records
):
    from sisaflow.data.corpus import to_table, write_table
    from sisaflow.data.sharding import shard_corpus, slice_of
    from sisaflow.pipeline.create import LORA_MODEL, LORA_TRAIN
    from sisaflow.training.loop import train_shard

    train = {**LORA_TRAIN, "threads": 2}
    params = make_params(
        model={"tokenizer": "base", "base": str(smollm2), "context_length": 128, "lora": LORA_MODEL["lora"]},
        train=train,
        sharding={"shards": 1, "slices": 2},
    )
    records = make_records(owners=6, per_owner=2)
    gone = next(o for o in sorted({r.owner for r in records}) if slice_of(o, 2) == 1)
    a = make_workspace(records, shards=1, slices=2, name="a")
    train_shard(a, 0, params, progress=lambda m: None)
    before = _files(a, 0, 2)

    kept = [r for r in records if r.owner != gone]
    write_table(a.corpus_file, to_table(kept))
    shard_corpus(a, params.sharding)
    rep = train_shard(a, 0, params, progress=lambda m: None)
    assert rep.start_slice == 1  # only the deleted owner's slice and after
    after = _files(a, 0, 2)
    assert after[(0, "model.safetensors")] == before[(0, "model.safetensors")]
    assert after[(1, "model.safetensors")] != before[(1, "model.safetensors")]

    b = make_workspace(kept, shards=1, slices=2, name="b")
    train_shard(b, 0, params, progress=lambda m: None)
    assert after == _files(b, 0, 2)  # adapter, optimizer state, counters, lineage: bitwise
