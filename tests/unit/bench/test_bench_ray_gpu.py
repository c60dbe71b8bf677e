"""bench/ray_gpu.py, the script a session with a GPU runs for issue 18 point 4 (S shards as Ray tasks sharing one
GPU): its --smoke mode runs on CPU with a real local Ray, through the same code path, so neither the script nor
bench/ray_gpu.sh can rot between sessions that have a device.

The script runs as its own process (in its own session), as on the GPU machine: it starts and stops its own Ray,
and its environment (cuBLAS's workspace, PYTHONPATH, Ray's settings) stays out of this test process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.procs import kill_session, session_pids

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "bench" / "ray_gpu.py"
SHELL = REPO / "bench" / "ray_gpu.sh"
RUNS = ("in_process", "ray_1", "ray_2")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUBLAS_WORKSPACE_CONFIG")}
    return {**env, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, list[int]]:
    """One --smoke run: its figures, its table, and the processes of its session still alive after it exited."""
    out = tmp_path_factory.mktemp("ray-gpu")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        log, _ = proc.communicate()
        pytest.fail(f"bench/ray_gpu.py --smoke ran past 180 s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    # ray.shutdown() stops the Ray the script started; its workers leave a moment after their raylet
    deadline = time.monotonic() + 30
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in session_pids(proc.pid) if pid != os.getpid()]
    kill_session(proc)
    return json.loads((out / "ray_gpu.json").read_text()), (out / "ray_gpu.md").read_text(), left


def test_every_run_trains_every_shard_and_slice(smoke):
    figures, _, _ = smoke
    setup = figures["setup"]
    shards = list(range(setup["shards"]))
    for key in RUNS:
        run = figures[key]
        assert run["shards_trained"] == shards, key
        assert run["slices_trained"] == {str(s): setup["slices"] for s in shards}, key
        assert run["devices"] == ["cpu"] and run["tokens_per_s"] > 0 and run["wall_seconds"] > 0
    # the same shards hold the same records, whoever trains them
    assert len({figures[key]["tokens"] for key in RUNS}) == 1 and figures["in_process"]["tokens"] > 0
    for key in ("ray_1", "ray_2"):
        assert figures[f"{key}_vs_in_process_wall"] > 0 and figures[f"{key}_vs_in_process_tokens_per_s"] > 0


def test_two_ray_runs_and_the_in_process_run_give_the_same_weights(smoke):
    """CPU training is deterministic: every shard's final weights are bitwise equal across the three runs, and
    the figures say so (on the GPU it is what the run finds out)."""
    figures, text, _ = smoke
    hashes = [figures[key]["weights"] for key in RUNS]
    assert len(hashes[0]) == figures["setup"]["shards"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes[0].values())
    assert len(set(hashes[0].values())) == len(hashes[0])  # different shards, different weights
    assert hashes[0] == hashes[1] == hashes[2]
    assert figures["ray_runs_bitwise_equal"] is True and figures["ray_equals_in_process"] is True
    assert "Two Ray runs bitwise equal (every shard's final weights): yes." in text
    assert text.count("| yes |") == 2  # the Ray rows; the in-process row is the reference


def test_the_ray_workers_see_the_scripts_settings_and_the_script_stops_its_ray(smoke):
    figures, _, left = smoke
    probe = figures["worker_probe"]
    assert probe["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert Path(probe["sisaflow"]) == REPO / "src" / "sisaflow"
    assert probe["pid"] != figures["driver_pid"]  # the tasks ran in Ray's workers, not in the script
    assert figures["ray"] and figures["ray_init_seconds"] > 0
    assert left == [], f"processes of the script's session still running after it exited: {left}"


def test_without_a_gpu_the_full_run_is_refused(tmp_path):
    """The script sees no GPU here even on a CUDA machine (CUDA_VISIBLE_DEVICES empty), so this runs everywhere."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        cwd=REPO,
        env={**_env(), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_the_device_script_says_what_is_missing(tmp_path):
    """bench/ray_gpu.sh: a call 2 on a machine that did not run call 1 says so, before installing anything."""
    assert subprocess.run(["bash", "-n", str(SHELL)]).returncode == 0
    usage = subprocess.run(["bash", str(SHELL)], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2 and "prepare|stash|run" in usage.stderr
    env = {**os.environ, "RAY_STASH": str(tmp_path / "stash"), "RAY_CARRY": str(tmp_path / "carry")}
    run = subprocess.run(
        ["bash", str(SHELL), "run"],
        cwd=REPO,
        env={**env, "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "run call 1 again" in run.stderr
    stash = subprocess.run(["bash", str(SHELL), "stash"], cwd=REPO, env=env, capture_output=True, text=True)
    assert stash.returncode == 1 and "prepare" in stash.stderr
