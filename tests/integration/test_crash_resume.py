"""A training killed with SIGKILL resumes from its last complete checkpoint and ends bitwise equal to a training
that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sisaflow import cli
from tests.integration.conftest import make_workspace, tree_hashes, write_corpus

pytestmark = pytest.mark.integration


def _slow_down(ws):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["epochs_per_slice"] = 6
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_sigkill_during_training_then_resume(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 12)
    a = make_workspace(tmp_path / "a", corpus, shards=2, slices=4)
    b = make_workspace(tmp_path / "b", corpus, shards=2, slices=4)
    for ws in (a, b):
        _slow_down(ws)
        assert cli.main(["--workspace", str(ws), "shard"]) == 0

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sisaflow.cli",
            "--workspace",
            str(a),
            "train",
            "--shard",
            "0",
            "--in-process",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = a / "models" / "shard-0" / "slice-0" / "meta.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed; make it slower"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    last = a / "models" / "shard-0" / "slice-3" / "meta.json"
    assert not last.exists(), "the kill came too late to test a resume"

    capsys.readouterr()
    assert cli.main(["--workspace", str(a), "train", "--shard", "0", "--in-process"]) == 0
    out = capsys.readouterr().out
    resumed_from = [
        int(line.split("trained from slice ")[1].split(",")[0])
        for line in out.splitlines()
        if "trained from slice" in line
    ]
    assert resumed_from and 1 <= resumed_from[0] <= 3, out
    assert not list((a / "models" / "shard-0").glob(".slice-*")), "a half-written checkpoint was left behind"

    assert cli.main(["--workspace", str(b), "train", "--shard", "0", "--in-process"]) == 0
    assert tree_hashes(a / "models" / "shard-0") == tree_hashes(b / "models" / "shard-0")
