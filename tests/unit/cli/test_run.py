"""The command line's Prefect defaults (`sisaflow.cli.run.prefect_env`): what a flow run without a server reads."""

from __future__ import annotations

import os

from sisaflow.cli.run import EPHEMERAL_STARTUP_S, prefect_env
from sisaflow.core.paths import Workspace


def _settings():
    """Prefect's settings as a process started now reads them (the current ones are read once, at import)."""
    from prefect.settings import Settings

    return Settings()


def test_a_throwaway_server_gets_time_to_start_and_a_users_choice_wins(tmp_path, monkeypatch):
    """A fresh Prefect home's first server start migrates its database: on a busy 2-core machine it took longer
    than Prefect's 20 s default and the flow failed. The CLI gives it EPHEMERAL_STARTUP_S unless told otherwise."""
    for name in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.setenv(name, "")  # recorded, so that what prefect_env sets is undone after the test
        monkeypatch.delenv(name)
    assert _settings().server.ephemeral.startup_timeout_seconds == 20  # Prefect's own default
    ws = Workspace(tmp_path / "ws")
    prefect_env(ws)
    assert _settings().server.ephemeral.startup_timeout_seconds == EPHEMERAL_STARTUP_S > 20
    assert os.environ["PREFECT_HOME"] == str(ws.prefect_home)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "45")
    prefect_env(ws)
    assert _settings().server.ephemeral.startup_timeout_seconds == 45
