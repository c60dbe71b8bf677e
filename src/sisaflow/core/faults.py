"""Test-only kill points: where the crash tests (tests/integration/test_forget_crash.py) SIGKILL a process
inside a step, at a place no outside observer can time (half a ledger line written, certificate files written
but not yet marked certified).

A kill point does nothing unless $SISAFLOW_TEST_KILL_AT names it; nothing but a test sets that variable. Names:
`ledger-append` (a request's ledger line), `state-append:<state>` (a state line), `certify` (between a
certificate's files and its `certified` state).
"""

from __future__ import annotations

import os
import signal
from typing import BinaryIO

KILL_ENV = "SISAFLOW_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process here when $SISAFLOW_TEST_KILL_AT is `name` (test-only); otherwise nothing."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def append(fh: BinaryIO, data: bytes, name: str) -> None:
    """`fh.write(data)`; test-only, when $SISAFLOW_TEST_KILL_AT is `name`: write the first half of `data`, make
    it durable and SIGKILL this process, as a crash in the middle of the append would leave the file."""
    if os.environ.get(KILL_ENV) == name:
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        kill_point(name)
    fh.write(data)
