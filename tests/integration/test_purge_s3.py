"""A DVC remote on S3 (a real S3-compatible server, moto's, started by the test): purge collects it, the scan
searches it, and while it cannot be reached no certificate is issued.

A tiny workspace is trained and pushed to the S3 remote. The server stops and an owner is forgotten: the forget
retrains and purges locally, but can neither collect nor search the remote, so the request stays purged,
uncertified, with the remote named as not searched. With the server back, the scan finds the deleted records in
the remote's objects (the old slice files); the next `sisaflow run` collects them (measured, by their s3:// URLs),
finds nothing left anywhere, and certifies.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.integration.conftest import make_workspace, write_corpus
from tests.s3_server import BUCKET, S3Server, use_as_dvc_remote

pytestmark = pytest.mark.integration

AUTHORS = 6
URL = f"s3://{BUCKET}/remote"


def _latest(root, kind: str) -> dict:
    return json.loads(sorted((root / "runs").glob(f"*-{kind}.json"))[-1].read_text())


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    from sisaflow import cli
    from sisaflow.core import versioning
    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace
    from sisaflow.data.sharding import slice_of
    from sisaflow.deletion import leftovers

    server = S3Server()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3Server.env().items():
            mp.setenv(k, v)
        server.start().make_bucket()
        tmp = tmp_path_factory.mktemp("purge-s3")
        root = make_workspace(tmp / "ws", write_corpus(tmp / "corpus.jsonl", AUTHORS))
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["dvc"]["remote"] = URL  # so that a run keeps the remote as it is
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        use_as_dvc_remote(root, server, URL)
        ws = Workspace(root)
        local = ["--workspace", str(root)]
        s: dict = {"ws": ws, "server": server}

        assert cli.main([*local, "run", "--no-prefect", "--in-process"]) == 0
        versioning.push(ws)
        s["pushed"] = server.keys(prefix="remote/")
        owner = next(str(i) for i in range(AUTHORS) if slice_of(str(i), 3) > 0)

        server.stop()
        forget = [
            *local,
            "forget",
            "--owner",
            owner,
            "--request-id",
            "req-s3",
            "--no-prefect",
            "--in-process",
        ]
        s["forget_rc"] = cli.main(forget)
        s["forget"] = _latest(root, "forget")
        s["certified_while_stopped"] = (root / "reports" / "certificates" / "req-s3.json").exists()

        server.start()  # the same port; moto keeps its objects in this process
        params = Params.load(ws.params_file)
        targets = leftovers.targets_from_ledger(ws, params)
        s["targets"] = targets
        s["before"] = leftovers.scan_report(ws, params, targets)
        assert cli.main([*local, "run", "--no-prefect", "--in-process"]) == 0
        s["run"] = _latest(root, "run")
        s["after"] = leftovers.scan_report(ws, params, targets)
        s["remote_after"] = server.keys(prefix="remote/")
        cache = root / ".dvc" / "cache"
        s["cache"] = {p.relative_to(cache).as_posix() for p in (cache / "files").rglob("*") if p.is_file()}
        yield s
        server.stop()


def test_with_the_server_stopped_the_forget_purges_locally_and_certifies_nothing(story):
    rep = story["forget"]
    assert rep["retrained_requests"] == ["req-s3"]
    assert rep["purge"]["remote_not_collected"] is True
    assert rep["purge"]["bytes_by_kind"].get("dvc-cache", 0) > 0  # the local cache was collected all the same
    assert rep["verify"]["not_searched"] == {"corpus-source": 1, "dvc-remote": 1}
    assert rep["certificates"] == {} and not story["certified_while_stopped"]


def test_the_scan_finds_the_deleted_records_in_the_s3_remote(story):
    found = story["before"].findings
    assert found, "the old slice files pushed before the forget are still in the remote"
    assert {f.where.split(":", 1)[0] for f in found} == {"dvc-remote"}
    texts = {f.record_id for f in found if f.what == "text"}
    assert texts == {t.record_id for t in story["targets"]}
    assert story["before"].not_searched() == {"corpus-source": 1}


def test_the_next_run_collects_the_remote_and_certifies(story):
    rep = story["run"]
    purge = rep["purge"]
    assert purge["remote_not_collected"] is False
    removed = [r for r in purge["removed"] if r["kind"] == "dvc-remote"]
    assert removed and all(r["path"].startswith(URL + "/files/md5/") and r["bytes"] > 0 for r in removed)
    gone = {r["path"][len(URL) + 1 :] for r in removed}
    assert gone == story["pushed"] - story["remote_after"]
    assert story["after"].findings == [] and story["after"].not_searched() == {"corpus-source": 1}
    assert list(rep["certificates"]) == ["req-s3"]
    cert = json.loads((story["ws"].root / "reports" / "certificates" / "req-s3.json").read_text())
    assert cert["verify_result"]["clean"] is True
    assert cert["verify_result"]["not_searched"] == {"corpus-source": 1}


def test_the_remote_keeps_only_what_the_current_outputs_use(story):
    assert story["remote_after"] and story["remote_after"] <= story["cache"]
