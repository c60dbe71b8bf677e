"""Where Prefect may keep a copy of what a flow handled, as this environment's Prefect settings say (read without
importing Prefect): the workspace's Prefect home (`.sisaflow/prefect`, where `sisaflow` points PREFECT_HOME
unless it is set), the home Prefect uses here ($PREFECT_HOME, else ~/.prefect: result storage, and the SQLite
database of a local server), result storage set apart from it (PREFECT_RESULTS_LOCAL_STORAGE_PATH) and a SQLite
database set apart (PREFECT_SERVER_DATABASE_CONNECTION_URL).

A setting comes from the environment, else from the active profile of the home's profiles.toml, as Prefect
reads it (`prefect config set` writes there). What cannot be searched from here is counted as not searched, with
a note: a place that exists but cannot be read, a server that PREFECT_API_URL puts on another machine (its
database holds flow-run parameters, states and logs), a database that is not SQLite, result storage in a block.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sisaflow.core.paths import Workspace
from sisaflow.scan.targets import ScanReport

STORAGE = ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH")
DATABASE = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
STORAGE_BLOCK = ("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK", "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK")


@dataclass(frozen=True)
class PrefectPlace:
    """A directory (or a database file) to search, and how its findings are labelled."""

    path: Path
    prefix: str
    """'prefect-home:' for the workspace's home (paths relative to it), 'prefect-home:<absolute path>/' for
    the others."""


def home() -> Path:
    """The Prefect home of this environment: $PREFECT_HOME, else Prefect's default ~/.prefect."""
    env = os.environ.get("PREFECT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".prefect"


def settings(prefect_home: Path) -> dict[str, str]:
    """Prefect's settings as this environment gives them: the active profile's, overridden by the environment's
    PREFECT_* variables."""
    out: dict[str, str] = {}
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home / "profiles.toml").expanduser()
    try:
        raw = tomllib.loads(profiles.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raw = {}
    active = os.environ.get("PREFECT_PROFILE") or raw.get("active")
    profile = raw.get("profiles", {}).get(active, {}) if isinstance(active, str) else {}
    if isinstance(profile, dict):
        out.update({k: str(v) for k, v in profile.items() if k.startswith("PREFECT_")})
    out.update({k: v for k, v in os.environ.items() if k.startswith("PREFECT_")})
    return out


def _first(values: dict[str, str], names: tuple[str, ...]) -> str:
    return next((values[n] for n in names if values.get(n)), "")


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _readable(path: Path) -> str:
    """'' when the directory or file at `path` can be searched, else why not."""
    try:
        if path.is_dir():
            os.listdir(path)
        elif path.is_file():
            with open(path, "rb"):
                pass
        else:
            return "neither a directory nor a file"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return ""


def prefect_places(ws: Workspace, report: ScanReport) -> list[PrefectPlace]:
    """The Prefect places to search (the workspace's home first), each existing and readable; counts into
    `report` those that cannot be searched. A place inside the workspace but outside its Prefect home is left
    to the workspace's own walk."""
    own = ws.prefect_home.resolve()
    out = [PrefectPlace(own, "prefect-home:")] if own.is_dir() else []
    covered = [own, ws.root.resolve()]
    values = settings(home())

    def add(path: Path, what: str) -> None:
        path = path.resolve()
        if _within(path, covered):
            return
        covered.append(path)
        if not path.exists():
            report.notes.append(f"{what} {path} does not exist: Prefect kept nothing there")
            return
        why = _readable(path)
        if why:
            report.not_searchable("prefect-home", f"{what} {path} is {why}: not searched")
            return
        out.append(
            PrefectPlace(path, f"prefect-home:{path.as_posix()}/" if path.is_dir() else "prefect-home:")
        )

    add(home(), "the Prefect home ($PREFECT_HOME, else ~/.prefect)")
    storage = _first(values, STORAGE)
    if storage:
        add(Path(storage).expanduser(), "Prefect's local result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH)")
    block = _first(values, STORAGE_BLOCK)
    if block:
        report.not_searchable(
            "prefect-result-storage",
            f"Prefect's default result storage is the block {block!r} (a bucket or a remote file system): "
            "not searched",
        )
    database = _first(values, DATABASE)
    if database.startswith("sqlite"):
        _, _, file = database.partition(":///")
        if file and not file.startswith(":memory:"):
            add(Path(file.split("?", 1)[0]).expanduser(), "Prefect's SQLite database")
    elif database:
        scheme = urlsplit(database).scheme or "unknown"
        report.not_searchable(
            "prefect-database", f"Prefect's database is a {scheme} server, not a file here: not searched"
        )
    api = values.get("PREFECT_API_URL", "")
    if api and not _loopback(api):
        report.not_searchable(
            "prefect-server",
            f"PREFECT_API_URL names a Prefect server on another machine ({urlsplit(api).hostname}): its "
            "database (flow-run parameters, states, logs) and its workers' result storage are not searched",
        )
    return out
