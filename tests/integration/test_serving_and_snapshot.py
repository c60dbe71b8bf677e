"""Promises about serving while requests wait, and about what one run applies.

- `unlearn.mode: exclude` with every constituent trained on a recorded request: serving refuses, saying why.
- `unlearn.mode: wait`: serving goes on with the old version until the retrained one is promoted, then switches.
- `status` lists the requests a killed run left half done (retrained, purged), not only the pending ones.
- A request recorded while a run is between reading the ledger and importing the corpus waits for the next run:
  the run applies and certifies only the requests it read, each with its own impact record.

One tiny workspace is trained once (in this process, without Prefect); each test works on its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import make_workspace, write_corpus

pytestmark = pytest.mark.integration

AUTHORS = 9


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from sisaflow import cli

    tmp = tmp_path_factory.mktemp("serving")
    root = make_workspace(tmp / "ws", write_corpus(tmp / "corpus.jsonl", AUTHORS), shards=3, slices=2)
    assert cli.main(["--workspace", str(root), "run", "--in-process", "--no-prefect"]) == 0
    return root


@pytest.fixture
def ws_root(trained, tmp_path) -> Path:
    """A copy of the trained workspace (git, DVC cache and remote inside it), for one test to change."""
    copy = tmp_path / "ws"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def _owner_per_shard(shards: int = 3) -> dict[int, str]:
    from sisaflow.data.sharding import shard_of

    out: dict[int, str] = {}
    for i in range(AUTHORS):
        out.setdefault(shard_of(str(i), shards), str(i))
    assert sorted(out) == list(range(shards)), "the corpus must give every shard an owner"
    return out


def _forget(root: Path, *args: str) -> int:
    from sisaflow import cli

    return cli.main(["--workspace", str(root), "forget", *args])


def _set_params(root: Path, section: str, **values) -> None:
    p = root / "params.yaml"
    params = yaml.safe_load(p.read_text())
    params[section].update(values)
    p.write_text(yaml.safe_dump(params, sort_keys=False))


def test_serving_refuses_when_every_constituent_is_excluded(ws_root, capsys):
    from sisaflow import cli
    from sisaflow.core.errors import WorkspaceError
    from sisaflow.core.paths import Workspace
    from sisaflow.inference.ensemble import Ensemble

    for shard, owner in _owner_per_shard().items():
        assert _forget(ws_root, "--owner", owner, "--request-id", f"req-{shard}", "--no-run") == 0
    with pytest.raises(
        WorkspaceError, match=r"every constituent \(shards 0, 1, 2\).*excluded until retrained"
    ):
        Ensemble.load(Workspace(ws_root))
    capsys.readouterr()
    assert cli.main(["--workspace", str(ws_root), "generate", "Question: who?"]) != 0
    err = capsys.readouterr().err
    assert "every constituent" in err and "sisaflow run" in err
    assert "Traceback" not in err
    # applying the requests brings serving back, from retrained constituents
    assert cli.main(["--workspace", str(ws_root), "run", "--in-process", "--no-prefect"]) == 0
    assert Ensemble.load(Workspace(ws_root)).shards == [0, 1, 2]


def test_wait_mode_serves_the_old_version_until_the_new_one_is_promoted(ws_root):
    from sisaflow.core import ledger
    from sisaflow.core.paths import Workspace
    from sisaflow.inference.ensemble import Ensemble, StaleEnsembleError

    ws = Workspace(ws_root)
    _set_params(ws_root, "unlearn", mode="wait")
    old = Ensemble.load(ws)
    owner = _owner_per_shard()[1]
    assert _forget(ws_root, "--owner", owner, "--request-id", "req-wait", "--no-run") == 0
    assert ledger.current_state(ws.ledger_file)["req-wait"] == "pending"  # not excluded in this mode
    waiting = Ensemble.load(ws)
    assert (waiting.version, waiting.shards, waiting.excluded) == (old.version, [0, 1, 2], [])
    old.check_current()  # the request alone changes nothing served

    assert _forget(ws_root, "--owner", owner, "--request-id", "req-wait", "--in-process", "--no-prefect") == 0
    new = Ensemble.load(ws)
    assert new.version != old.version and new.shards == [0, 1, 2]
    with pytest.raises(StaleEnsembleError, match="changed since this one was loaded"):
        old.check_current()  # the promotion switches serving
    assert ledger.current_state(ws.ledger_file)["req-wait"] == "certified"


def test_status_lists_requests_a_killed_run_left_half_done(ws_root, capsys):
    from sisaflow import cli
    from sisaflow.core import ledger
    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace
    from sisaflow.deletion import requests
    from sisaflow.pipeline import steps
    from sisaflow.pipeline.status import workspace_status

    ws = Workspace(ws_root)
    params = Params.load(ws.params_file)
    owner = _owner_per_shard()[2]
    assert _forget(ws_root, "--owner", owner, "--request-id", "req-half", "--no-run") == 0
    # what a forget killed after its promotion leaves: the records gone, the shard retrained, the request
    # marked retrained, and no purge, scan or certificate yet
    steps.prepare(ws, params)
    steps.shard(ws, params)
    steps.train(ws, params, sorted(steps.stale_shards(ws, params)), in_process=True)
    steps.ensemble(ws, params)
    assert requests.mark_applied(ws) == ["req-half"]
    assert requests.pending_requests(ws) == []  # its records are gone from the corpus

    st = workspace_status(ws)
    assert [(p["request_id"], p["state"]) for p in st["open_requests"]] == [("req-half", "retrained")]
    capsys.readouterr()
    assert cli.main(["--workspace", str(ws_root), "status"]) == 0
    out = capsys.readouterr().out
    assert "req-half (retrained)" in out

    ledger.mark(ws.ledger_file, ["req-half"], "purged")
    assert [p["state"] for p in workspace_status(ws)["open_requests"]] == ["purged"]
    assert cli.main(["--workspace", str(ws_root), "run", "--in-process", "--no-prefect"]) == 0
    assert workspace_status(ws)["open_requests"] == []
    assert ledger.current_state(ws.ledger_file)["req-half"] == "certified"


def test_a_request_recorded_after_the_run_read_the_ledger_waits_for_the_next_run(ws_root):
    from sisaflow.core import ledger, versioning
    from sisaflow.core.paths import Workspace
    from sisaflow.data.corpus import from_table, read_table
    from sisaflow.pipeline import sequence

    ws = Workspace(ws_root)
    owners = _owner_per_shard()
    first, late = owners[0], owners[2]
    assert _forget(ws_root, "--owner", first, "--request-id", "req-first", "--no-run") == 0

    class RequestArrivesDuringTheRun(sequence.StepRunner):
        """Records a request after the run read the ledger and before it imports the corpus."""

        arrived = False

        def __call__(self, name, root, *args):
            if name == "prepare" and not self.arrived:
                self.arrived = True
                assert _forget(Path(root), "--owner", late, "--request-id", "req-late", "--no-run") == 0
            return super().__call__(name, root, *args)

    runner = RequestArrivesDuringTheRun()
    result = sequence.forget(str(ws_root), "req-first", in_process=True, runner=runner)
    assert runner.arrived
    report = result.report
    assert report.retrained_requests == ["req-first"]
    assert sorted(report.trained) == [0]  # the late owner's shard 2 is not retrained by this run
    assert set(report.certificates) == {"req-first"}
    cert = json.loads(Path(report.certificates["req-first"][0]).read_text())
    assert [a["shard"] for a in cert["affected"]] == [0]
    state = ledger.current_state(ws.ledger_file)
    assert state == {"req-first": "certified", "req-late": "excluded"}
    owners_now = {r.owner for r in from_table(read_table(ws.corpus_file))}
    assert first not in owners_now and late in owners_now  # the late request is not applied half
    # DVC does not record the import as up to date with a ledger it did not read
    assert "prepare" in versioning.status(ws)

    again = sequence.drain(str(ws_root), in_process=True).report
    assert again.retrained_requests == ["req-late"] and sorted(again.trained) == [2]
    cert = json.loads(Path(again.certificates["req-late"][0]).read_text())
    assert [a["shard"] for a in cert["affected"]] == [2]
    assert versioning.status(ws) == {}


def test_a_request_for_records_already_gone_recorded_mid_run_waits_for_the_next_run(ws_root):
    """Issue 25, point 5: a second request for the same owner, recorded after this run read the ledger and
    recorded its impact, but before its import; the import then drops her records for the first request, so at
    `mark_applied` the second one's records are gone too. This run must not mark it applied or certify it (it
    has no impact record of this run). Mutant: `mark_applied(ws)` without the run's requests: the late request
    is certified by this run."""
    from sisaflow.core import ledger
    from sisaflow.core.paths import Workspace
    from sisaflow.pipeline import sequence

    ws = Workspace(ws_root)
    owner = _owner_per_shard()[1]
    assert _forget(ws_root, "--owner", owner, "--request-id", "req-one", "--no-run") == 0

    class SameOwnerAgainAfterTheImport(sequence.StepRunner):
        arrived = False

        def __call__(self, name, root, *args):
            if name == "prepare" and not self.arrived:  # after the impact step, her records still imported
                self.arrived = True
                assert _forget(Path(root), "--owner", owner, "--request-id", "req-again", "--no-run") == 0
            return super().__call__(name, root, *args)

    runner = SameOwnerAgainAfterTheImport()
    report = sequence.forget(str(ws_root), "req-one", in_process=True, runner=runner).report
    assert runner.arrived
    assert report.retrained_requests == ["req-one"] and set(report.certificates) == {"req-one"}
    assert ledger.current_state(ws.ledger_file)["req-again"] in ("pending", "excluded")
    again = sequence.drain(str(ws_root), in_process=True).report  # the next run records it, then certifies
    assert again.retrained_requests == ["req-again"] and set(again.certificates) == {"req-again"}
    assert ledger.current_state(ws.ledger_file) == {"req-one": "certified", "req-again": "certified"}


def test_a_flow_signs_with_the_key_of_a_prefect_secret_block(ws_root, tmp_path, prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    from sisaflow import cli
    from sisaflow.deletion import signing
    from sisaflow.flows.drain import drain_flow

    for name in (signing.SIGNING_KEY_ENV, signing.SIGNING_KEY_PEM_ENV, signing.HMAC_KEY_ENV):
        monkeypatch.delenv(name, raising=False)
    key = tmp_path / "vault" / "signing-key.pem"
    _, public, fp = signing.write_key_pair(key)
    Secret(value=key.read_text()).save("sisaflow-test-signing-key", overwrite=True)
    key.unlink()  # the key now lives in Prefect only

    assert _forget(ws_root, "--owner", _owner_per_shard()[0], "--request-id", "req-signed", "--no-run") == 0
    result = drain_flow(str(ws_root), in_process=True, signing_key_secret="sisaflow-test-signing-key")
    cert_file = result.report.certificates["req-signed"][0]
    cert = json.loads(Path(cert_file).read_text())
    assert cert["signature"]["alg"] == "ed25519" and cert["signature"]["public_key_sha256"] == fp
    assert signing.SIGNING_KEY_PEM_ENV not in os.environ  # held in memory, never in the environment
    assert cli.main(["certificate", "--verify", cert_file, "--public-key", str(public)]) == 0
    assert not list(ws_root.rglob("*.pem"))  # never written into the workspace


def test_the_operator_opens_a_certificate_for_an_auditor_record_by_record(
    ws_root, tmp_path, capsys, monkeypatch
):
    from sisaflow import cli
    from sisaflow.core.config import Params
    from sisaflow.core.hashing import workspace_hasher
    from sisaflow.core.paths import Workspace
    from sisaflow.data.corpus import content_hash, read_records

    ws = Workspace(ws_root)
    params = Params.load(ws.params_file)
    owner = _owner_per_shard()[1]
    source = read_records(ws.source(params.corpus.path), params.corpus, workspace_hasher(ws, params.corpus))
    # signed with the workspace's own key, whatever key another test left in the environment: --verify checks
    # the signature first, with the workspace's public key
    for name in ("SISAFLOW_SIGNING_KEY", "SISAFLOW_SIGNING_KEY_PEM", "SISAFLOW_CERTIFICATE_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["--workspace", str(ws_root), "keys", "init"]) == 0
    assert _forget(ws_root, "--owner", owner, "--request-id", "req-open", "--in-process", "--no-prefect") == 0
    cert = ws_root / "reports" / "certificates" / "req-open.json"
    listed = json.loads(cert.read_text())["content_hashes"]
    theirs = [r for r in source if r.owner == owner]
    other = next(r for r in source if r.owner != owner)
    # without the key, the listed hashes match no record hashed in the open
    assert not {content_hash(r.record_id, r.text) for r in theirs} & set(listed)

    def check(records) -> tuple[int, str]:
        f = tmp_path / "records.jsonl"
        f.write_text("".join(json.dumps({"id": r.record_id, "text": r.text}) + "\n" for r in records))
        capsys.readouterr()
        rc = cli.main(
            ["--workspace", str(ws_root), "certificate", "--verify", str(cert), "--records", str(f)]
        )
        return rc, capsys.readouterr().out

    rc, out = check(theirs)
    assert rc == 0 and out.count(": listed") == len(theirs) == 20
    rc, out = check([theirs[0], other])
    assert rc == 1 and f"{other.record_id}: NOT listed" in out and f"{theirs[0].record_id}: listed" in out
    assert other.text not in out and theirs[0].text not in out
