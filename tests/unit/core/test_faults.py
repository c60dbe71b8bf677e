"""faults: a kill point does nothing unless $SISAFLOW_TEST_KILL_AT names it; armed, `append` leaves half the
data on disk and the process dies by SIGKILL there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from sisaflow.core import faults

SCRIPT = """
import sys
from sisaflow.core import faults
with open(sys.argv[1], "ab") as fh:
    faults.append(fh, b'{"request_id": "r1"}\\n', "ledger-append")
print("survived")
"""


def _run(path, env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != faults.KILL_ENV}
    if env_value is not None:
        env[faults.KILL_ENV] = env_value
    return subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True)


def test_unarmed_or_armed_elsewhere_is_a_plain_write(tmp_path):
    for value in (None, "certify"):
        path = tmp_path / f"{value}.jsonl"
        done = _run(path, value)
        assert done.returncode == 0 and "survived" in done.stdout, done.stderr
        assert path.read_bytes() == b'{"request_id": "r1"}\n'
    faults.kill_point("certify")  # this process has nothing armed: returns


def test_armed_append_leaves_half_a_line_and_dies(tmp_path):
    path = tmp_path / "ledger.jsonl"
    done = _run(path, "ledger-append")
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout
    assert path.read_bytes() == b'{"request_id": "r1"}\n'[:10]
