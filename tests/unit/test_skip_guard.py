"""The suite's own rule (tests/conftest.py): in `make test` only a test marked `gpu` may skip; any other skip is
reported as a failure, naming its reason. Checked on a throwaway test file run with the suite's conftest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_skip_fails_unless_the_test_needs_a_gpu(tmp_path):
    """Mutant: the conftest hook removed (or its `gpu` check inverted): the counts below change."""
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\n"
        "def test_misses_something():\n    pytest.skip('no `dvc` executable')\n\n"
        "@pytest.mark.gpu\ndef test_needs_cuda():\n    pytest.skip('needs a CUDA device')\n\n"
        "@pytest.mark.xfail(reason='known')\ndef test_known():\n    assert False\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stdout
    assert "1 failed, 1 skipped, 1 xfailed" in run.stdout, run.stdout
    assert "only a test marked `gpu` may skip: Skipped: no `dvc` executable" in run.stdout
