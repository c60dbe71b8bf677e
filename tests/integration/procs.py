"""Helpers for tests that start real processes (the sisaflow CLI, a Prefect server, a Ray head): executables,
free ports, log tails, and stopping what a test started by its own process group, never by name."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def executable_beside(name: str) -> str:
    """The console script `name` installed beside this Python (or on PATH); fails the test without it (`make
    setup` installs every one the tests use)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"no `{name}` executable beside this Python or on PATH: run `make setup`")
    return found


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    """The last `n` characters of a log file, for failure messages."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a process started with start_new_session=True: its own process group, and nothing else."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def session_pids(sid: int) -> list[int]:
    """The processes in session `sid` (a process started with start_new_session=True and everything it started,
    Ray workers included: they get process groups of their own, not sessions)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def proc_title(pid: int) -> str:
    """A process's command line as `ps` shows it ("ray::_train_task" for a Ray worker running that task); empty
    once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True, its process group and whatever else is left in its
    session (by process id), then reap it."""
    for pid in [proc.pid, *session_pids(proc.pid)]:
        try:
            os.killpg(pid, signal.SIGKILL) if pid == proc.pid else os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def sisaflow_env(prefect_home: Path) -> dict[str, str]:
    """This environment for a sisaflow subprocess: no Prefect server (a throwaway one per flow), its own home."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    prefect_home.mkdir(parents=True, exist_ok=True)
    env["PREFECT_HOME"] = str(prefect_home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def sisaflow_cmd(ws: Path, *args: str) -> list[str]:
    """The command line of `sisaflow --workspace ws ARGS`, run by this Python."""
    return [sys.executable, "-m", "sisaflow.cli", "--workspace", str(ws), *args]


def run_sisaflow(cmd: list[str], prefect_home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a sisaflow command line to completion, capturing its output."""
    return subprocess.run(
        cmd, env=sisaflow_env(prefect_home), capture_output=True, text=True, timeout=timeout
    )


def clean_env() -> dict[str, str]:
    """This environment without any Prefect setting or workspace: nothing leaks in from the session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "SISAFLOW_WORKSPACE"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0", COLUMNS="200")
    return env


def start_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `cmd` in its own session (so `stop_group` stops it and its children), output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> float:
    """Seconds until `url` answers 200; fails the test if the process exits or the time runs out."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the server exited with {proc.returncode} before answering:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"{url}: not healthy after {timeout_s:.0f}s:\n{tail(log)}")
        time.sleep(0.5)
