"""The scan searches the Prefect home this environment uses when it lies outside the workspace (a real server's
usual setting), with result storage set apart from it, and names as not searched what it cannot read."""

from __future__ import annotations

import base64
import json
import os
import pickle

from sisaflow.scan import places, prefect_home
from tests.unit.scan.test_places import _base, _records, _targets


def _persisted_result(text: str) -> str:
    """A Prefect persisted result: JSON around base64 of a pickle (the text is not in its raw bytes)."""
    payload = base64.encodebytes(pickle.dumps({"rows": [text]})).decode()
    return json.dumps({"metadata": {"serializer": {"type": "pickle"}}, "result": payload})


def test_a_prefect_home_outside_the_workspace_is_searched(tmp_path, monkeypatch):
    ws, params = _base(tmp_path / "ws", tmp_path / "remote")
    r1, r2 = (r for r in _records() if r.record_id in ("rec-0001", "rec-0002"))
    home, results = tmp_path / "prefect-home", tmp_path / "results"
    (home / "storage").mkdir(parents=True)
    (home / "storage" / "f00d").write_text(_persisted_result(r2.text))
    results.mkdir()
    (results / "beef").write_text(_persisted_result(r1.text))
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(results))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a server on this machine

    rep = places.scan_report(ws, params, _targets(ws, params))
    found = {(f.where, f.what, f.record_id) for f in rep.findings}
    assert found == {
        (f"prefect-home:{home.resolve().as_posix()}/storage/f00d", "text", "rec-0002"),
        (f"prefect-home:{results.resolve().as_posix()}/beef", "text", "rec-0001"),
    }
    assert rep.findings_by_location() == {"prefect-home": 2}
    assert rep.not_searched() == {"corpus-source": 1}


def test_a_prefect_home_that_cannot_be_read_is_named_not_searched(tmp_path, monkeypatch):
    ws, params = _base(tmp_path / "ws", tmp_path / "remote")
    home = tmp_path / "prefect-home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    listdir = os.listdir

    def denied(path):  # root reads a mode-000 directory all the same, so the refusal is simulated
        if os.fspath(path) == str(home.resolve()):
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(prefect_home.os, "listdir", denied)
    rep = places.scan_report(ws, params, _targets(ws, params))
    assert rep.not_searched() == {"corpus-source": 1, "prefect-home": 1}
    assert any(
        str(home.resolve()) in n and "Permission denied" in n and "not searched" in n for n in rep.notes
    )


def test_a_remote_prefect_server_and_a_storage_block_are_named_not_searched(tmp_path, monkeypatch):
    """PREFECT_API_URL, from the environment or from the active profile (`prefect config set` writes there),
    naming a server on another machine: its database is out of reach."""
    ws, params = _base(tmp_path / "ws", tmp_path / "remote")
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "prod"\n\n[profiles.prod]\nPREFECT_API_URL = "https://prefect.example.com/api"\n'
    )
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK", "s3-bucket/results")
    rep = places.scan_report(ws, params, _targets(ws, params))
    assert rep.not_searched() == {"corpus-source": 1, "prefect-result-storage": 1, "prefect-server": 1}
    assert any("prefect.example.com" in n and "not searched" in n for n in rep.notes)

    monkeypatch.setenv(
        "PREFECT_API_URL", "http://localhost:4200/api"
    )  # the environment wins over the profile
    monkeypatch.delenv("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK")
    assert places.scan_report(ws, params, _targets(ws, params)).not_searched() == {"corpus-source": 1}
