"""Fixtures for whole-pipeline tests: one Prefect test server for the session, tiny workspaces."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOFU = REPO / "data" / "tofu" / "records.jsonl"
TEMPLATE = "Question: {question}\\nAnswer: {answer}"
TINY = {
    "model": {"hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64, "context_length": 128},
    "train": {"batch_size": 16, "epochs_per_slice": 1, "warmup_steps": 2, "log_every": 50},
    "ray": {"object_store_memory_mb": 200},
}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server (SQLite) for every flow run in the session."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_corpus(path: Path, authors: int, skip_owners: set[str] = frozenset()) -> Path:
    """The first `authors` TOFU authors (20 records each), minus `skip_owners`."""
    lines = TOFU.read_text().splitlines()[: authors * 20]
    kept = [ln for ln in lines if str(json.loads(ln)["author_id"]) not in skip_owners]
    path.write_text("\n".join(kept) + "\n")
    return path


_KEY_DIR = Path(tempfile.mkdtemp(prefix="sisaflow-test-hash-key-"))


def shared_hash_key() -> Path:
    """One hash key for every test workspace of the session, as one operator's workspaces share theirs: a
    workspace trained from scratch then has the same record hashes (lineage) as the one it is compared with."""
    from sisaflow.core.hashing import write_new_key

    key = _KEY_DIR / "hash-key"
    if not key.exists():
        write_new_key(key)
    return key


def make_workspace(
    directory: Path, corpus: Path, shards: int = 3, slices: int = 3, fields: list[str] | None = None
) -> Path:
    """`sisaflow init` a workspace (TOFU's fields unless `fields` gives the init options) with the session's hash
    key, then shrink the model and training for tests."""
    from sisaflow import cli
    from sisaflow.core import versioning
    from sisaflow.core.paths import Workspace

    fields = fields or ["--owner-field", "author_id", "--text-template", TEMPLATE]
    rc = cli.main(
        [
            "init",
            str(directory),
            "--corpus",
            str(corpus),
            *fields,
            "--shards",
            str(shards),
            "--slices",
            str(slices),
            "--hash-key",
            str(shared_hash_key()),
            # the tests choose each certificate's key themselves (HMAC, a key file, a Prefect Secret block)
            "--no-signing-key",
        ]
    )
    assert rc == 0
    params = yaml.safe_load((directory / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    versioning.git_commit(Workspace(directory), "tiny params for tests", ["params.yaml"])
    return directory


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    from sisaflow.core.fsio import sha256_file

    if not root.exists():
        return {}
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
