"""Every scan test sees one Prefect setting: a Prefect home of its own that does not exist, and no server, so a
developer's ~/.prefect or PREFECT_API_URL cannot change what a scan finds or leaves out."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def own_prefect_settings(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect") / "home"))
        for name in (
            "PREFECT_API_URL",
            "PREFECT_PROFILE",
            "PREFECT_PROFILES_PATH",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
            "PREFECT_LOCAL_STORAGE_PATH",
            "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
            "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL",
            "PREFECT_API_DATABASE_CONNECTION_URL",
        ):
            mp.delenv(name, raising=False)
        yield
