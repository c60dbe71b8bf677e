"""Deleting every record: the request still completes, the served ensemble is empty, and generate says why."""

from __future__ import annotations

import pytest

from sisaflow import cli
from sisaflow.core import ledger
from sisaflow.core.errors import WorkspaceError
from tests.integration.conftest import make_workspace, write_corpus

pytestmark = pytest.mark.integration


# no capsys here: Prefect's log handler would keep the captured stream and fail every later flow run
def test_forget_every_owner(tmp_path, prefect_server):
    from sisaflow.core.paths import Workspace
    from sisaflow.inference.ensemble import Ensemble

    corpus = write_corpus(tmp_path / "corpus.jsonl", 2)
    ws = make_workspace(tmp_path / "ws", corpus, shards=1, slices=2)
    assert cli.main(["--workspace", str(ws), "run", "--in-process"]) == 0
    cmd = [
        "--workspace",
        str(ws),
        "forget",
        "--owner",
        "0",
        "--owner",
        "1",
        "--request-id",
        "all",
        "--in-process",
    ]
    assert cli.main(cmd) == 0
    assert ledger.current_state(ws / "deletions" / "ledger.jsonl") == {"all": "certified"}
    with pytest.raises(WorkspaceError, match="every record of the corpus has been deleted"):
        Ensemble.load(Workspace(ws))
    assert cli.main(["--workspace", str(ws), "generate", "Question:"]) == 1
