"""A `sisaflow forget` killed with SIGKILL at any step is finished by the next `sisaflow run`: the request ends
certified exactly once, DVC is clean, no temporary file is left, and the served ensemble equals the one a forget
that was never interrupted serves. Right after each kill, the registry still names complete checkpoints only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sisaflow.core import ledger, versioning
from sisaflow.core.fsio import sha256_file
from sisaflow.core.paths import Workspace
from sisaflow.data.sharding import slice_of
from tests.integration.conftest import make_workspace, write_corpus
from tests.integration.procs import run_sisaflow, sisaflow_cmd, sisaflow_env

pytestmark = pytest.mark.integration

REQUEST = "req-crash"
TEMP_TOPS = ("shards", "models", "corpus", "registry")


class RegistryIncomplete(AssertionError):
    """The registry named a checkpoint that was gone or overwritten right after the kill."""


def _forget_args(ws: Path, owner: str) -> list[str]:
    return sisaflow_cmd(ws, "forget", "--owner", owner, "--request-id", REQUEST, "--in-process")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _stamps(paths: list[Path]) -> dict[Path, tuple[int, int, int] | None]:
    return {p: _stamp(p) for p in paths}


def _constituents(ws: Path) -> dict[int, str]:
    """{shard: sha256 of the served weights}, read from the checkpoint files the registry names."""
    reg = json.loads((ws / "registry" / "ensemble.json").read_text())
    return {c["shard"]: sha256_file(ws / c["served"] / "model.safetensors") for c in reg["constituents"]}


def _registry_complete(ws: Path) -> list[str]:
    """The checkpoints the registry names that are missing or incomplete (empty when the version is whole)."""
    reg = json.loads((ws / "registry" / "ensemble.json").read_text())
    missing = []
    for c in reg["constituents"]:
        d = ws / c["served"]  # the frozen copy that is served (models/ may be mid-retraining)
        if not (d / "lineage.json").is_file() or not (d / "model.safetensors").is_file():
            missing.append(c["served"])
        elif sha256_file(d / "model.safetensors") != c["weights_sha256"]:
            missing.append(c["served"] + " (weights differ)")
    return missing


def _temp_leftovers(ws: Path) -> list[str]:
    out = []
    for top in TEMP_TOPS:
        base = ws / top
        if base.is_dir():
            out += [str(p.relative_to(ws)) for p in base.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    return out


def _state_lines(ws: Path) -> list[str]:
    path = ws / "deletions" / "states.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln)["state"] for ln in path.read_text().splitlines() if ln.strip() and REQUEST in ln]


def _cache_files(ws: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(ws / ".dvc" / "cache"))  # os.walk skips vanished dirs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny workspace trained once, the owner to forget, its shard, and the constituents a forget that was
    never interrupted serves."""
    tmp = tmp_path_factory.mktemp("forget-crash")
    corpus = write_corpus(tmp / "corpus.jsonl", 8)
    base = make_workspace(tmp / "base", corpus, shards=2, slices=4)
    params = yaml.safe_load((base / "params.yaml").read_text())
    params["train"]["epochs_per_slice"] = int(os.environ.get("EPOCHS", "1"))
    (base / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    versioning.git_commit(Workspace(base), "crash test params", ["params.yaml"])
    t0 = time.monotonic()
    done = run_sisaflow(sisaflow_cmd(base, "run", "--in-process"), tmp / "prefect-base")
    assert done.returncode == 0, done.stdout + done.stderr
    train_seconds = time.monotonic() - t0
    # an owner placed in slice 0: its shard retrains every slice, so a kill can land between two checkpoints
    owners = sorted({str(json.loads(ln)["author_id"]) for ln in corpus.read_text().splitlines()})
    owner = next(o for o in owners if slice_of(o, 4) == 0)

    ref = tmp / "reference"
    shutil.copytree(base, ref, symlinks=True)
    slices_before = _stamps(sorted(ref.glob("shards/*/slice-*.parquet")))
    done = run_sisaflow(_forget_args(ref, owner), tmp / "prefect-ref")
    assert done.returncode == 0, done.stdout + done.stderr
    touched = {p.parent.name for p, s in slices_before.items() if _stamp(p) != s}
    assert len(touched) == 1, touched
    assert _state_lines(ref)[-1] == "certified", _state_lines(ref)
    return {
        "tmp": tmp,
        "base": base,
        "owner": owner,
        "shard_dir": touched.pop(),
        "reference": _constituents(ref),
        "certificate": _proof(ref),
        "train_seconds": train_seconds,
    }


def _proof(ws: Path) -> dict:
    """What the request's certificate says was touched: its shards and slices, retired and new checkpoints."""
    cert = json.loads((ws / "reports" / "certificates" / f"{REQUEST}.json").read_text())
    return {k: cert[k] for k in ("affected", "retired_checkpoints", "new_checkpoints", "content_hashes")}


def _slice_rewritten(ws: Path, shard_dir: str) -> Callable[[], bool]:
    before = _stamps(sorted((ws / "shards" / shard_dir).glob("slice-*.parquet")))
    return lambda: any(_stamp(p) != s for p, s in before.items())


def _checkpoint_appeared(ws: Path, shard_dir: str) -> Callable[[], bool]:
    """A retrained checkpoint is complete: a meta.json that was not there before (a new file, so a new inode).
    Not the directory's stamp: the forget first removes the stale checkpoints, and a directory half removed
    changes its stamp while its old meta.json may still be there for a moment."""
    model_dir = ws / "models" / shard_dir
    before = {p: _stamp(p) for p in model_dir.glob("slice-*/meta.json")}

    def hit() -> bool:
        return any(
            before.get(p) != (s := _stamp(p)) and s is not None for p in model_dir.glob("slice-*/meta.json")
        )

    return hit


def _promoted(ws: Path, shard_dir: str) -> Callable[[], bool]:
    reg = ws / "registry" / "ensemble.json"
    before = reg.read_bytes()
    return lambda: reg.is_file() and reg.read_bytes() != before


def _purging(ws: Path, shard_dir: str) -> Callable[[], bool]:
    files = _cache_files(ws)
    return lambda: "purged" in _state_lines(ws) or _cache_files(ws) < files


RECOVERY: dict[str, Callable[[Path], list[str]]] = {
    "run": lambda ws: sisaflow_cmd(ws, "run", "--in-process"),
    "drain": lambda ws: [
        sys.executable,
        "-c",
        "import sys; from sisaflow.flows.drain import drain_flow; drain_flow(sys.argv[1], in_process=True)",
        str(ws),
    ],
}

KILL_POINTS = {
    "slice-rewrite": _slice_rewritten,
    "training": _checkpoint_appeared,
    "promotion": _promoted,
    "purge": _purging,
}


# the next `sisaflow run` finishes the request after a kill at any step; so does the drain flow (the scheduled
# deployment's flow, run here in a process of its own as a worker would)
@pytest.mark.parametrize(
    ("point", "recovery"),
    [
        ("slice-rewrite", "run"),
        ("training", "run"),
        ("promotion", "run"),
        ("purge", "run"),
        ("training", "drain"),
        ("purge", "drain"),
    ],
)
def test_sigkill_forget_then_recovery(trained, point, recovery):
    tmp, owner, shard_dir = trained["tmp"], trained["owner"], trained["shard_dir"]
    ws = tmp / f"ws-{point}-{recovery}"
    shutil.copytree(trained["base"], ws, symlinks=True)
    hit = KILL_POINTS[point](ws, shard_dir)

    proc = subprocess.Popen(
        _forget_args(ws, owner),
        env=sisaflow_env(tmp / f"prefect-{point}-{recovery}-forget"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and not hit() and time.monotonic() < deadline:
            time.sleep(0.005)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if finished:
        pytest.skip(f"{point}: the forget finished ({proc.returncode}) before the kill point was seen")
    assert hit(), f"{point}: timed out waiting for the kill point"
    states_at_kill = _state_lines(ws)
    assert "certified" not in states_at_kill, f"{point}: the kill came after the forget had finished"
    incomplete_at_kill = _registry_complete(ws)

    done = run_sisaflow(RECOVERY[recovery](ws), tmp / f"prefect-{point}-{recovery}")
    assert done.returncode == 0, f"{point}: recovery run failed\n{done.stdout}\n{done.stderr}"

    seq = _state_lines(ws)
    assert len(seq) == len(set(seq)), (
        f"{point}: a state was logged twice: {seq} (at the kill: {states_at_kill})"
    )
    assert seq and seq[-1] == "certified", (
        f"{point}: request not certified: {seq} (at the kill: {states_at_kill})"
    )
    assert [r.request_id for r in ledger.read_ledger(ws / "deletions" / "ledger.jsonl")].count(REQUEST) == 1
    assert versioning.status(Workspace(ws)) == {}, f"{point}: dvc status not clean"
    assert _constituents(ws) == trained["reference"], f"{point}: served ensemble differs from the reference"
    assert not _registry_complete(ws)
    # the certificate says what an uninterrupted forget's says, though the recovery run retrained less or nothing
    assert _proof(ws) == trained["certificate"], f"{point}: the certificate differs from the reference"
    assert not _temp_leftovers(ws), f"{point}: temporary files left: {_temp_leftovers(ws)}"
    if incomplete_at_kill:
        raise RegistryIncomplete(
            f"{point}: right after the kill the registry named checkpoints that were gone or overwritten: "
            f"{incomplete_at_kill}"
        )
