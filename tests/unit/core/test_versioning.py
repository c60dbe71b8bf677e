"""versioning: the DVC remote follows params' dvc.remote, also when params change it after `sisaflow init`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sisaflow.core import versioning
from sisaflow.core.config import Params
from sisaflow.core.paths import Workspace
from sisaflow.core.versioning import default_remote


def _params(remote: str) -> Params:
    return Params.from_dict({"dvc": {"remote": remote}})


def test_ensure_remote_changes_the_remote_only_when_params_do(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws.root, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=ws.root, check=True)
    versioning.configure_remote(ws, _params(".dvc-remote"))
    assert versioning.ensure_remote(ws, _params(".dvc-remote")) is False  # as init left it: nothing to do
    assert versioning.ensure_remote(ws, _params(str(ws.root / ".dvc-remote"))) is False  # the same place

    assert versioning.ensure_remote(ws, _params("../elsewhere")) is True
    assert default_remote(ws)[2] == (tmp_path / "elsewhere").resolve()
    assert versioning.ensure_remote(ws, _params("s3://bucket/sisaflow")) is True
    assert default_remote(ws)[:2] == ("storage", "s3://bucket/sisaflow")
    assert versioning.ensure_remote(ws, _params("s3://bucket/sisaflow")) is False


def test_outputs_recorded_allows_newer_dependencies_only():
    deps = {"prepare": [{"changed deps": {"deletions/ledger.jsonl": "modified"}}]}
    outs = {
        "prepare": [
            {"changed deps": {"x": "modified"}},
            {"changed outs": {"corpus/records.parquet": "modified"}},
        ]
    }
    assert versioning.outputs_recorded({}) and versioning.outputs_recorded(deps)
    assert not versioning.outputs_recorded(outs)
    assert not versioning.outputs_recorded({"train@0": ["changed checksum"]})
