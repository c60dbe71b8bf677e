"""Impact records: every file of a retired checkpoint that holds what training learnt (weights and optimizer state)
is recorded before a run changes anything, read back for the scan and the certificate; older records (weights
only) are still read."""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import pyarrow as pa
import pytest

from sisaflow.core.config import Params
from sisaflow.core.fsio import read_json, write_json
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import write_table
from sisaflow.data.sharding import PLACEMENT_SCHEMA
from sisaflow.deletion.impact import impact_file, record_impact, retired_file_hashes, retired_files
from sisaflow.scan.targets import RetiredFile
from sisaflow.training.checkpoint import MODEL_FILE, OPTIMIZER_FILE


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def placed(tmp_path):
    """Shard 1 holds the deleted record in slice 2 (of 4); each checkpoint has its weights and optimizer state."""
    ws = Workspace(tmp_path)
    write_table(
        ws.corpus_file,
        pa.table({"record_id": ["r-kept", "r-gone"], "content_hash": [sha(b"kept"), sha(b"gone")]}),
    )
    write_table(
        ws.placement_file,
        pa.table(
            {"record_id": ["r-gone", "r-kept"], "shard": [1, 0], "slice": [2, 0]}, schema=PLACEMENT_SCHEMA
        ),
    )
    write_json(ws.sharding_file, {"shards": 4, "slices": 4})
    files = {}
    for shard in (0, 1):
        for k in range(4):
            d = ws.checkpoint_dir(shard, k)
            d.mkdir(parents=True)
            for name, size in ((MODEL_FILE, 300), (OPTIMIZER_FILE, 600)):
                data = os.urandom(size)
                (d / name).write_bytes(data)
                files[(shard, k, name)] = data
    return SimpleNamespace(ws=ws, files=files)


def _checkpoints(files) -> dict[int, dict[int, str]]:
    """What pipeline.checkpoint_hashes gives: the weights hash of every checkpoint."""
    return {s: {k: sha(files[(s, k, MODEL_FILE)]) for k in range(4)} for s in (0, 1)}


def test_the_optimizer_state_of_every_retired_checkpoint_is_recorded(placed):
    ws, files = placed.ws, placed.files
    request = SimpleNamespace(request_id="req-1", content_hashes=[sha(b"gone")])
    assert record_impact(ws, Params(), [request], _checkpoints(files)) == ["req-1"]
    shard = read_json(impact_file(ws, "req-1"))["shards"]["1"]
    assert shard["from_slice"] == 2 and sorted(shard["retired"]) == ["2", "3"]
    for k in ("2", "3"):
        assert shard["retired_files"][k] == {
            MODEL_FILE: {"sha256": sha(files[(1, int(k), MODEL_FILE)]), "bytes": 300},
            OPTIMIZER_FILE: {"sha256": sha(files[(1, int(k), OPTIMIZER_FILE)]), "bytes": 600},
        }
    found = retired_files(ws, ["req-1"])
    assert found == {
        sha(files[(1, k, name)]): RetiredFile("req-1", f"shard-1/slice-{k}", kind, size)
        for k in (2, 3)
        for name, kind, size in ((MODEL_FILE, "weights", 300), (OPTIMIZER_FILE, "optimizer-state", 600))
    }
    assert retired_file_hashes(read_json(impact_file(ws, "req-1"))) == {
        f"shard-1/slice-{k}": {
            MODEL_FILE: sha(files[(1, k, MODEL_FILE)]),
            OPTIMIZER_FILE: sha(files[(1, k, OPTIMIZER_FILE)]),
        }
        for k in (2, 3)
    }


def test_an_impact_record_of_an_older_version_gives_the_weights_alone(placed):
    ws, files = placed.ws, placed.files
    weights = sha(files[(1, 3, MODEL_FILE)])
    old = {
        "request_id": "req-old",
        "slices": 4,
        "shards": {
            "1": {"holding": [3], "from_slice": 3, "retired": {"3": weights}, "retired_bytes": {"3": 300}}
        },
    }
    write_json(impact_file(ws, "req-old"), old)
    assert retired_files(ws, ["req-old"]) == {
        weights: RetiredFile("req-old", "shard-1/slice-3", "weights", 300)
    }
    assert retired_file_hashes(old) == {"shard-1/slice-3": {MODEL_FILE: weights}}
