"""Training on a real Ray cluster (`ray start --head` on loopback) gives the same weights as in-process training.

The head runs as a separate process group started here, the driver connects through `ray.address` in params
(the path a user with a cluster takes), and both shards must come back with checkpoints bitwise equal to those
of the same workspace trained in this process. That proves the Ray worker path (params serialised to a dict,
`Workspace(root)` rebuilt in the worker, a fresh process with Ray's thread settings) computes the same thing.

Token authentication: since Ray 2.59 a local `ray.init()` turns token auth on by default and writes
~/.ray/auth_token; `ray start --head` turns it on whenever that file exists and RAY_AUTH_MODE is unset, while a
driver given an explicit address turns it on only if RAY_AUTH_MODE=token. So that the outcome does not depend on
what ran before on this machine, the head is started with RAY_AUTH_MODE=disabled (loopback only, torn down at
the end of the test) and the driver gets the same setting. A driver with token mode on (a local `ray.init()`
earlier in this process sets RAY_AUTH_MODE=token in os.environ) still connects to a cluster with auth disabled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import ray  # noqa: F401  (a dependency: its absence fails, never skips)
import yaml

from sisaflow.core.config import CorpusParams, ShardingParams  # noqa: E402
from sisaflow.core.paths import Workspace  # noqa: E402
from sisaflow.pipeline import steps  # noqa: E402
from sisaflow.pipeline.create import init_workspace  # noqa: E402
from tests.integration.procs import executable_beside, free_port, session_pids  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOFU = REPO / "data" / "tofu" / "records.jsonl"
SHARDS, SLICES = 2, 2
HEAD_START_TIMEOUT = 120.0
HEAD_STOP_TIMEOUT = 20.0


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 in its own session; yields its address, kills the session afterwards."""
    # short: Ray's socket paths (<temp-dir>/session_<date>_<pid>/sockets/...) must stay under 108 bytes
    temp_dir = tempfile.mkdtemp(prefix="sfray-", dir="/tmp")
    port = free_port()
    log_path = Path(temp_dir) / "head.log"
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        # ray >= 2.5x drains for up to 30 s on SIGTERM; nothing here needs draining
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    cmd = [
        executable_beside("ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--object-store-memory",
        str(200 * 1024 * 1024),
        "--include-dashboard",
        "false",
        # the defaults (8265, 10001, 52365) are fixed ports: another Ray on this machine would collide
        "--dashboard-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--temp-dir",
        temp_dir,
        "--block",
    ]
    log = open(log_path, "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while not ("Ray runtime started" in log_path.read_text(errors="replace") and _accepts(port)):
            if head.poll() is not None:
                pytest.fail(
                    f"ray start exited with {head.returncode}:\n{log_path.read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"ray head not up after {HEAD_START_TIMEOUT:.0f}s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield f"127.0.0.1:{port}"
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(HEAD_STOP_TIMEOUT)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # workers (ray::IDLE) run in their own process groups but the head's session; they exit once their
        # raylet is gone, this makes sure of it
        for pid in session_pids(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _make_workspace(root: Path) -> Workspace:
    """A 10-author corpus, 2 shards x 2 slices, a tiny model; prepared and sharded, not trained."""
    root.mkdir(parents=True)
    corpus = root / "small.jsonl"
    with open(TOFU, encoding="utf-8") as fh:
        corpus.write_text("".join(fh.readline() for _ in range(200)), encoding="utf-8")
    cp = CorpusParams(
        path="x",
        format="jsonl",
        id_field="id",
        owner_field="author_id",
        text_field=None,
        text_template="Question: {question}\nAnswer: {answer}",
    )
    ws = init_workspace(root / "ws", corpus, cp, ShardingParams(SHARDS, SLICES))
    raw = yaml.safe_load(ws.params_file.read_text())
    raw["model"].update(hidden_size=32, layers=1, heads=2, intermediate_size=64, context_length=128)
    raw["train"].update(batch_size=16, device="cpu")
    ws.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = steps.load(ws)
    steps.prepare(ws, params)
    steps.shard(ws, params)
    return ws


def _set_address(ws: Workspace, address: str) -> None:
    raw = yaml.safe_load(ws.params_file.read_text())
    raw["ray"]["address"] = address
    ws.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def _weights(ws: Workspace) -> dict[tuple[int, int], str]:
    out = {}
    for s in range(SHARDS):
        for k in range(SLICES):
            f = ws.checkpoint_dir(s, k) / "model.safetensors"
            assert f.is_file(), f"{f} missing"
            out[(s, k)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_cluster_training_matches_in_process(tmp_path, ray_head, monkeypatch):

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not ray.is_initialized(), "another test left a Ray session connected"

    on_ray = _make_workspace(tmp_path / "ray")
    local = Workspace(tmp_path / "local" / "ws")
    shutil.copytree(on_ray.root.parent, local.root.parent, symlinks=True)  # same corpus, shards and params
    _set_address(on_ray, ray_head)

    params = steps.load(on_ray)
    assert params.ray.address == ray_head
    report = steps.train(on_ray, params, list(range(SHARDS)))
    assert not ray.is_initialized(), "train_shards left the driver connected to the cluster"

    # (a) both shards trained on the cluster, every slice
    assert report.address == ray_head
    assert [r.shard for r in report.shards] == list(range(SHARDS))
    for r in report.shards:
        assert r.start_slice == 0
        assert [s.slice for s in r.slices] == list(range(SLICES))
        assert r.tokens > 0  # a slice may be empty (placement is by owner), a shard is not
    assert steps.stale_shards(on_ray, params) == {}

    # (b) the same workspace trained in this process gives bitwise the same checkpoints
    local_params = steps.load(local)
    local_report = steps.train(local, local_params, list(range(SHARDS)), in_process=True)
    assert [(s.slice, s.examples, s.tokens, s.steps, s.loss) for r in report.shards for s in r.slices] == [
        (s.slice, s.examples, s.tokens, s.steps, s.loss) for r in local_report.shards for s in r.slices
    ]
    assert _weights(on_ray) == _weights(local)
    assert steps.checkpoint_hashes(on_ray, params) == steps.checkpoint_hashes(local, local_params)
