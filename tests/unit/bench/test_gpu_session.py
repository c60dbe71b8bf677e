"""bench/gpu_session.sh, the plan a session with a GPU runs for issue 18: both of its calls in GPU_SMOKE mode on
the CPU (every script's --smoke, Ray from this environment instead of the carried wheel), so that the commands,
paths and flags of the plan cannot rot between sessions that have a device. Each phase runs in its own process
session, and whatever it leaves behind (Ray's processes) is killed by PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.procs import kill_session

REPO = Path(__file__).resolve().parents[3]


def _phase(number: int, out: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUBLAS_WORKSPACE_CONFIG")}
    env.update(GPU_SMOKE="1", OUT=str(out), PYTHON=sys.executable, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        ["bash", "bench/gpu_session.sh", str(number)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=420)
    finally:
        kill_session(proc)  # what the phase left (its Ray) goes with it
    assert proc.returncode == 0, text
    return text


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gpu-session")
    return out, _phase(1, out) + _phase(2, out)


def test_both_calls_run_every_piece_and_keep_their_files_within_the_tools_limits(out):
    folder, text = out
    for line in ("pytest exit 0", "graph_generate exit 0", "ray_gpu exit 0", "train-profile exit 0"):
        assert line in text, text
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    call1 = {"pytest.log", "graph.log", "graph/graph.json", "graph/graph.md"}
    assert call1 <= set(files)
    assert len(call1) <= 8 and len(set(files) - call1) <= 8, files  # what one call brings back
    assert all(f.count("/") <= 1 for f in files), files


def test_the_smoke_figures_are_the_scripts_own(out):
    folder, _ = out
    graph = json.loads((folder / "graph" / "graph.json").read_text())
    assert graph["smoke"] and graph["scratch"] and graph["lora"]
    ray = json.loads((folder / "ray" / "ray_gpu.json").read_text())
    assert ray["smoke"]
    profile = json.loads((folder / "gpu" / "gpu.json").read_text())["train_profile"]
    assert profile["variants"] and [r["setting"] for r in profile["sweep"]] == [
        "strict-padded",
        "nondeterministic",
    ]
    log = (folder / "pytest.log").read_text()
    assert "skipped" in log and "failed" not in log  # on the CPU the gpu-marked tests skip, none fails
