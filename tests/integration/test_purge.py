"""purge after a forget: the deleted records' old shard files and checkpoints leave the DVC cache and the remote.

A tiny workspace is trained (Prefect + Ray + DVC) and pushed, forgets one owner and is pushed again. Before the
purge, places.scan finds the deleted texts in the DVC cache and the remote (the superseded slice files); after it,
nowhere but the corpus source, which it excludes. The current outputs are untouched and DVC is still clean.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import make_workspace, tree_hashes, write_corpus

pytestmark = pytest.mark.integration

AUTHORS = 6


def _dvc(ws_root: Path, *args: str) -> subprocess.CompletedProcess:
    from sisaflow.core.paths import Workspace
    from sisaflow.core.versioning import run_tool

    return run_tool(Workspace(ws_root), "dvc", *args)


@pytest.fixture(scope="module")
def story(tmp_path_factory, prefect_server):
    from sisaflow import cli  # noqa: I001
    from sisaflow.core import versioning
    from sisaflow.deletion import purge
    from sisaflow.deletion import leftovers
    from sisaflow.core.config import Params
    from sisaflow.data.corpus import to_table, write_table
    from sisaflow.core.paths import Workspace
    from sisaflow.data.sharding import shard_of, slice_of

    tmp = tmp_path_factory.mktemp("purge")
    corpus = write_corpus(tmp / "corpus.jsonl", AUTHORS)
    root = make_workspace(tmp / "ws", corpus)
    ws = Workspace(root)
    params = Params.load(ws.params_file)
    s: dict = {"ws": ws, "params": params, "corpus": corpus}

    assert cli.main(["--workspace", str(root), "run"]) == 0
    versioning.push(ws)  # the remote now holds the outputs with the owner's records
    owner = next(str(i) for i in range(AUTHORS) if slice_of(str(i), 3) > 0)
    s["owner"], s["shard"] = owner, shard_of(owner, 3)
    # record the request, then apply it with the library's steps but without the flow's own purge, to see
    # what a forget leaves behind before purging
    cmd = ["--workspace", str(root), "forget", "--owner", owner, "--request-id", "req-purge", "--no-run"]
    assert cli.main(cmd) == 0
    from sisaflow.pipeline import steps

    steps.prepare(ws, params)
    steps.shard(ws, params)
    steps.train(ws, params, sorted(steps.stale_shards(ws, params)), in_process=True)
    steps.ensemble(ws, params)
    assert steps.record(ws, params) == {}
    versioning.push(ws)

    targets = leftovers.targets_from_ledger(ws, params)
    assert len(targets) == 20 and all(t.text for t in targets)
    s["targets"] = targets
    # an interrupted write of the imported corpus, from before the forget: a temporary file beside it
    from sisaflow.core.hashing import workspace_hasher
    from sisaflow.data.corpus import read_records

    old = [
        r
        for r in read_records(corpus, params.corpus, workspace_hasher(ws, params.corpus))
        if r.owner == owner
    ]
    s["stale_tmp"] = ws.corpus_dir / ".records.parquet.k3j2h1.tmp"
    write_table(s["stale_tmp"], to_table(old))

    s["before"] = leftovers.scan_report(ws, params, targets)
    s["outputs_before"] = {d: tree_hashes(root / d) for d in ("corpus", "shards", "models", "registry")}
    s["outputs_before"]["corpus"].pop(s["stale_tmp"].name)
    s["dvc_lock"] = ws.dvc_lock.read_bytes()

    t0 = time.perf_counter()
    s["purge"] = purge.purge(ws, params)
    s["purge_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s["after"] = leftovers.scan_report(ws, params, targets)
    s["scan_seconds"] = time.perf_counter() - t0
    s["purge_again"] = purge.purge(ws, params)
    return s


def test_before_purge_the_deleted_texts_are_in_the_dvc_cache_and_the_remote(story):
    found = story["before"].findings
    by_place = {(f.where.split(":", 1)[0], f.what) for f in found if ":" in f.where}
    assert ("dvc-cache", "text") in by_place
    assert ("dvc-remote", "text") in by_place
    assert ("dvc-cache", "content_hash") in by_place  # lineage.json of the superseded checkpoints
    # the current outputs hold none of it; only the interrupted write in corpus/ does
    tree = {f.where for f in found if ":" not in f.where}
    assert tree == {"corpus/" + story["stale_tmp"].name}
    texts = {f.record_id for f in found if f.where.startswith("dvc-cache:") and f.what == "text"}
    assert texts == {t.record_id for t in story["targets"]}


def test_after_purge_nothing_is_found_anywhere(story):
    after = story["after"]
    assert after.findings == [], [f.to_json() for f in after.findings][:10]
    assert any(str(story["corpus"]) in e and "corpus source" in e for e in after.excluded)
    assert after.git_objects_scanned > 0 and after.files_scanned > 0


def test_purge_reports_what_it_removed(story):
    rep = story["purge"]
    kinds = rep.bytes_by_kind()
    assert kinds.get("dvc-cache", 0) > 0
    assert kinds.get("dvc-remote", 0) > 0
    assert rep.total_bytes == sum(kinds.values())
    assert any(r.kind == "stale-temp" and r.path == str(story["stale_tmp"]) for r in rep.removed)
    assert not story["stale_tmp"].exists()
    d = json.loads(json.dumps(rep.to_json()))
    assert d["total_bytes"] == rep.total_bytes and all(x["bytes"] >= 0 for x in d["removed"])
    ws_root, remote = story["ws"].root, story["ws"].root / ".dvc-remote"
    for r in rep.removed:
        assert Path(r.path).is_relative_to(ws_root) or Path(r.path).is_relative_to(story["ws"].ray_tmp_dir)
        assert not Path(r.path).exists()
    assert any(Path(r.path).is_relative_to(remote) for r in rep.removed)


def test_purge_is_idempotent(story):
    again = story["purge_again"].bytes_by_kind()
    assert again.get("dvc-cache", 0) == 0 and again.get("dvc-remote", 0) == 0


def test_current_outputs_are_intact_and_dvc_clean(story):
    from sisaflow.core import versioning

    ws = story["ws"]
    assert versioning.status(ws) == {}
    assert json.loads(_dvc(ws.root, "status", "--cloud", "--json").stdout or "{}") == {}
    _dvc(ws.root, "checkout")
    assert ws.dvc_lock.read_bytes() == story["dvc_lock"]
    for d, before in story["outputs_before"].items():
        assert tree_hashes(ws.root / d) == before, f"{d} changed"
    deleted = {t.record_id for t in story["targets"]}
    for f in sorted((ws.root / "shards").rglob("*.parquet")):
        ids = set(pq.read_table(f).column("record_id").to_pylist())
        assert not ids & deleted


def test_cache_and_remote_hold_only_what_dvc_lock_references(story):
    ws = story["ws"]
    # after the forget's push, both held the current objects; now they hold those and nothing else
    ws_cache = ws.root / ".dvc" / "cache"
    objects = {p.relative_to(ws_cache / "files") for p in (ws_cache / "files").rglob("*") if p.is_file()}
    remote = ws.root / ".dvc-remote"
    remote_objects = {p.relative_to(remote / "files") for p in (remote / "files").rglob("*") if p.is_file()}
    assert objects == remote_objects
    assert not (ws_cache / "runs").exists()


def test_ray_sessions_in_use_are_kept_and_others_removed(tmp_path):
    """Ray's temporary directory: a session a running process names stays, the others go."""
    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace
    from sisaflow.deletion import purge

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    (ws.root / "params.yaml").write_text("{}\n")
    ws.ledger_file.parent.mkdir()
    ws.ledger_file.touch()
    tmp = ws.ray_tmp_dir
    assert not tmp.exists()
    live, dead = tmp / "session_2026-01-01_00-00-00_000001_1", tmp / "session_2026-01-01_00-00-00_000002_2"
    for s in (live, dead):
        (s / "logs").mkdir(parents=True)
        (s / "logs" / "worker.out").write_text("x" * 100)
    (tmp / "session_latest").symlink_to(dead)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--session-dir={live}"])
    try:
        rep = purge.purge(ws, Params())
        removed = {r.path: r for r in rep.removed if r.kind == "ray-tmp"}
        assert str(dead) in removed and removed[str(dead)].bytes == 100
        assert str(tmp / "session_latest") in removed
        assert live.is_dir() and not dead.exists()
        assert any("in use" in n for n in rep.notes)
        proc.kill()
        proc.wait()
        rep = purge.purge(ws, Params())
        assert not tmp.exists()
        assert sum(r.bytes for r in rep.removed if r.kind == "ray-tmp") == 100
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
