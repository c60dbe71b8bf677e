"""A `sisaflow forget` killed with SIGKILL at any step, or inside one, is finished by the next `sisaflow run`: the
request ends certified exactly once, DVC is clean, no temporary file is left, and the served ensemble equals the one
a forget that was never interrupted serves. Right after each kill, the registry still names complete checkpoints
only. So does a forget whose Ray worker (not the driver) is killed mid-training.

Kill points between steps are watched from outside (a file changes, then the test kills the process group); kill
points inside a step that no outsider can time (half a ledger line written; the certificate written, not yet
marked) are armed with $SISAFLOW_TEST_KILL_AT (`sisaflow.core.faults`), and the process kills itself there. A
kill point the forget never reached fails the test, naming it."""

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

from sisaflow.core import faults, ledger, versioning
from sisaflow.core.fsio import sha256_file
from sisaflow.core.paths import Workspace
from sisaflow.data.sharding import slice_of
from tests.integration.conftest import make_workspace, write_corpus
from tests.integration.procs import (
    kill_session,
    proc_title,
    run_sisaflow,
    session_pids,
    sisaflow_cmd,
    sisaflow_env,
    tail,
)

pytestmark = pytest.mark.integration

REQUEST = "req-crash"
SLICES = 4
TEMP_TOPS = ("shards", "models", "corpus", "registry")


class RegistryIncomplete(AssertionError):
    """The registry named a checkpoint that was gone or overwritten right after the kill."""


def _forget_args(ws: Path, owner: str, flags: tuple[str, ...] = ("--in-process",)) -> list[str]:
    return sisaflow_cmd(ws, "forget", "--owner", owner, "--request-id", REQUEST, *flags)


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
    """The request's states in the state log, as the ledger reads it (a torn last line is not one)."""
    return [s["state"] for s in ledger.states(ws / "deletions" / "ledger.jsonl").get(REQUEST, [])]


def _torn_aside(ws: Path) -> list[str]:
    """The torn lines the ledger set aside (`<file>.torn-<time>` beside the ledger and the state log)."""
    return sorted(p.name for p in (ws / "deletions").glob("*.torn-*"))


def _cache_files(ws: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(ws / ".dvc" / "cache"))  # os.walk skips vanished dirs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny workspace trained once, the owner to forget, its shard, and the constituents a forget that was
    never interrupted serves."""
    tmp = tmp_path_factory.mktemp("forget-crash")
    corpus = write_corpus(tmp / "corpus.jsonl", 8)
    base = make_workspace(tmp / "base", corpus, shards=2, slices=SLICES)
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
    owner = next(o for o in owners if slice_of(o, SLICES) == 0)

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


def _committing(ws: Path, shard_dir: str) -> Callable[[], bool]:
    """Inside `dvc commit`: it has put a new output in the DVC cache (nothing before it writes there) and has
    not yet written dvc.lock (it writes every stage's entry at the end, at once)."""
    files, lock = _cache_files(ws), (ws / "dvc.lock").read_bytes()
    return lambda: _cache_files(ws) > files and (ws / "dvc.lock").read_bytes() == lock


def _mid_commit(ws: Path, shard_dir: str) -> Callable[[], str | None]:
    """After the kill: why it did not land inside `dvc commit` (None when it did)."""
    lock = (ws / "dvc.lock").read_bytes()
    return lambda: (
        "dvc commit had already written dvc.lock" if (ws / "dvc.lock").read_bytes() != lock else None
    )


RECOVERY: dict[str, Callable[[Path, str], list[list[str]]]] = {
    "run": lambda ws, owner: [sisaflow_cmd(ws, "run", "--in-process")],
    "drain": lambda ws, owner: [
        [
            sys.executable,
            "-c",
            "import sys; from sisaflow.flows.drain import drain_flow; drain_flow(sys.argv[1], in_process=True)",
            str(ws),
        ]
    ],
    # a request whose append was cut short was never acknowledged: its caller asks again, then a run applies it
    "retry+run": lambda ws, owner: [
        _forget_args(ws, owner, ("--no-run",)),
        sisaflow_cmd(ws, "run", "--in-process"),
    ],
}

# watched from outside: (when to kill the process group, after the kill: why it missed the step or None)
WATCHED: dict[str, tuple[Callable, Callable | None]] = {
    "slice-rewrite": (_slice_rewritten, None),
    "training": (_checkpoint_appeared, None),
    "promotion": (_promoted, None),
    "dvc-commit": (_committing, _mid_commit),
    "purge": (_purging, None),
}


def _ledger_torn(ws: Path) -> str | None:
    raw = (ws / "deletions" / "ledger.jsonl").read_bytes()
    if raw.endswith(b"\n") or not raw.rsplit(b"\n", 1)[-1].startswith(b"{"):
        return "the ledger does not end in a torn line"
    if REQUEST in [r.request_id for r in ledger.read_ledger(ws / "deletions" / "ledger.jsonl")]:
        return "the torn request reads as recorded"
    return None


def _states_torn(ws: Path) -> str | None:
    raw = (ws / "deletions" / "states.jsonl").read_bytes()
    if raw.endswith(b"\n"):
        return "the state log does not end in a torn line"
    return None if "retrained" not in _state_lines(ws) else "the torn state reads as reached"


def _certificate_unmarked(ws: Path) -> str | None:
    if not (ws / "reports" / "certificates" / f"{REQUEST}.json").is_file():
        return "no certificate was written"
    return None if "certified" not in _state_lines(ws) else "the request was marked certified"


# armed with $SISAFLOW_TEST_KILL_AT (sisaflow.core.faults): where the process kills itself, and after the kill,
# why the files do not show it died there (None when they do)
ARMED: dict[str, Callable[[Path], str | None]] = {
    "ledger-append": _ledger_torn,  # half the request's ledger line written
    "state-append:retrained": _states_torn,  # half of its `retrained` line written
    "certify": _certificate_unmarked,  # its certificate files written, not yet marked certified
}


# the next `sisaflow run` finishes the request after a kill at any step; so does the drain flow (the scheduled
# deployment's flow, run here in a process of its own as a worker would)
@pytest.mark.parametrize(
    ("point", "recovery"),
    [
        ("slice-rewrite", "run"),
        ("training", "run"),
        ("promotion", "run"),
        ("dvc-commit", "run"),
        ("purge", "run"),
        ("training", "drain"),
        ("purge", "drain"),
        ("ledger-append", "retry+run"),
        ("state-append:retrained", "run"),
        ("certify", "run"),
    ],
)
def test_sigkill_forget_then_recovery(trained, point, recovery):
    tmp, owner, shard_dir = trained["tmp"], trained["owner"], trained["shard_dir"]
    name = f"{point.replace(':', '-')}-{recovery}"
    ws = tmp / f"ws-{name}"
    shutil.copytree(trained["base"], ws, symlinks=True)
    env = sisaflow_env(tmp / f"prefect-{name}-forget")
    if point in ARMED:
        env[faults.KILL_ENV] = point
    else:
        hit, after_kill = WATCHED[point][0](ws, shard_dir), WATCHED[point][1]
        missed = after_kill(ws, shard_dir) if after_kill else (lambda: None)

    proc = subprocess.Popen(
        _forget_args(ws, owner),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if point in ARMED:
            try:
                rc = proc.wait(timeout=240)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{point}: the forget neither reached the kill point nor finished in 240 s")
            if rc != -signal.SIGKILL:
                pytest.fail(f"{point}: the forget never reached this kill point (it exited with {rc})")
            problem = ARMED[point](ws)
        else:
            deadline = time.monotonic() + 240
            while proc.poll() is None and not hit() and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.poll() is not None:
                pytest.fail(f"{point}: missed this kill point: the forget exited ({proc.returncode}) first")
            if not hit():
                pytest.fail(f"{point}: the forget did not reach this kill point in 240 s")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            problem = missed()
    finally:
        kill_session(proc)  # what the forget started (a Prefect server, dvc) goes with it
    assert problem is None, f"{point}: missed this kill point: {problem}"
    states_at_kill = _state_lines(ws)
    assert "certified" not in states_at_kill, f"{point}: the kill came after the forget had finished"
    incomplete_at_kill = _registry_complete(ws)

    for i, cmd in enumerate(RECOVERY[recovery](ws, owner)):
        done = run_sisaflow(cmd, tmp / f"prefect-{name}-{i}")
        assert done.returncode == 0, f"{point}: recovery step {i} failed\n{done.stdout}\n{done.stderr}"

    _assert_finished_once(ws, trained, point, states_at_kill)
    if point.startswith(("ledger-append", "state-append")):
        assert _torn_aside(ws), f"{point}: the torn line was not set aside"
    if incomplete_at_kill:
        raise RegistryIncomplete(
            f"{point}: right after the kill the registry named checkpoints that were gone or overwritten: "
            f"{incomplete_at_kill}"
        )


def _assert_finished_once(ws: Path, trained: dict, point: str, states_at_kill: list[str]) -> None:
    """The request certified exactly once, with the served weights and certificate of the forget that was
    never interrupted; DVC clean; no temporary file left."""
    seq = _state_lines(ws)
    assert len(seq) == len(set(seq)), (
        f"{point}: a state was logged twice: {seq} (at the kill: {states_at_kill})"
    )
    assert seq and seq[-1] == "certified", (
        f"{point}: request not certified: {seq} (at the kill: {states_at_kill})"
    )
    assert [r.request_id for r in ledger.read_ledger(ws / "deletions" / "ledger.jsonl")].count(REQUEST) == 1
    certs = sorted(p.name for p in (ws / "reports" / "certificates").iterdir())
    assert certs == [f"{REQUEST}.html", f"{REQUEST}.json"], f"{point}: certificates/ holds {certs}"
    cert = json.loads((ws / "reports" / "certificates" / f"{REQUEST}.json").read_text())
    assert [s["state"] for s in cert["states"]] == seq, (
        f"{point}: the certificate's timeline {cert['states']}"
    )
    assert versioning.status(Workspace(ws)) == {}, f"{point}: dvc status not clean"
    assert _constituents(ws) == trained["reference"], f"{point}: served ensemble differs from the reference"
    assert not _registry_complete(ws)
    # the certificate says what an uninterrupted forget's says, though the recovery run retrained less or nothing
    assert _proof(ws) == trained["certificate"], f"{point}: the certificate differs from the reference"
    assert not _temp_leftovers(ws), f"{point}: temporary files left: {_temp_leftovers(ws)}"


def _train_workers(sid: int) -> list[int]:
    """The Ray workers in the forget's session running the training task (not the driver, not idle workers)."""
    return [pid for pid in session_pids(sid) if proc_title(pid).startswith("ray::_train_task")]


# a Ray worker killed mid-training: Ray runs the task again (max_retries), or the forget fails; either way the
# next `sisaflow run` ends where an uninterrupted forget does
def test_sigkill_ray_worker_mid_training_then_run(trained):
    tmp, owner, shard_dir = trained["tmp"], trained["owner"], trained["shard_dir"]
    ws = tmp / "ws-ray-worker"
    shutil.copytree(trained["base"], ws, symlinks=True)
    hit = _checkpoint_appeared(ws, shard_dir)
    last = ws / "models" / shard_dir / f"slice-{SLICES - 1}" / "meta.json"
    last_before = _stamp(last)

    log = tmp / "ray-worker-forget.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            _forget_args(ws, owner, ()),  # trains on Ray: no --in-process
            env=sisaflow_env(tmp / "prefect-ray-worker-forget"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not hit() and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is not None:
            pytest.fail(
                f"ray-worker: the forget exited ({proc.returncode}) before a retrained checkpoint appeared"
            )
        if not hit():
            pytest.fail("ray-worker: no retrained checkpoint appeared in 300 s")
        workers = _train_workers(proc.pid)
        assert workers, "ray-worker: no Ray worker running the training task in the forget's session"
        assert proc.pid not in workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        # the forget removes the stale checkpoints first: the last one is gone, or not yet removed
        assert _stamp(last) in (None, last_before), (
            "ray-worker: the kill came after the shard's last checkpoint"
        )
        try:
            proc.wait(timeout=300)  # Ray runs the task again (max_retries), or the forget fails
        except subprocess.TimeoutExpired:
            pytest.fail("ray-worker: the forget did not end within 300 s of the worker's kill")
    finally:
        kill_session(proc)
        shutil.rmtree(
            Workspace(ws).ray_tmp_dir, ignore_errors=True
        )  # outside tmp_path, keyed by the workspace
    states_at_kill = _state_lines(ws)

    done = run_sisaflow(sisaflow_cmd(ws, "run", "--in-process"), tmp / "prefect-ray-worker-run")
    assert done.returncode == 0, (
        f"ray-worker: recovery run failed\n{done.stdout}\n{done.stderr}\nthe forget's log:\n{tail(log)}"
    )
    _assert_finished_once(ws, trained, f"ray-worker (forget exited {proc.returncode})", states_at_kill)
