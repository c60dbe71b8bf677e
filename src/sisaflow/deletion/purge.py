"""After a deletion is promoted, remove every copy of superseded data that sisaflow's tools keep on the side.

`purge` removes, measuring each item's bytes before removing it:

- DVC cache objects that the workspace's current dvc.yaml/dvc.lock no longer reference (`dvc gc --workspace`),
  and DVC's run cache (`<cache>/runs`, stage records of earlier runs);
- the same objects in the default DVC remote (`dvc gc --workspace --cloud -r <remote>`), a local directory or an
  object store (S3 through the dvc-s3 plugin: its objects are listed before and after, so what went is measured
  there too); skipped with a note when no remote is configured or nothing was pushed yet, and flagged
  (`remote_not_collected`) when DVC cannot collect it (unreachable, no plugin, denied);
- Prefect's persisted results under the workspace's Prefect home (`<prefect home>/storage`; never the database);
- Ray's temporary and spill files for this workspace (`ws.ray_tmp_dir`): session directories that no running
  process names on its command line (a running Ray keeps its session);
- stale temporary files and directories left by interrupted atomic writes (`.<name>.*.tmp`, `.<name>.old`) under
  corpus/, shards/, models/ and registry/.

It deletes nothing outside the workspace except ws.ray_tmp_dir and, through DVC, unreferenced objects of the
configured remote; a DVC cache configured outside the workspace (a shared cache) is left alone, with a note.
Call it with the workspace lock held (`core.lock.workspace_lock`), after the forget's `dvc commit`: it refuses to
run while `dvc status` is not clean, because then dvc.lock would not describe the promoted outputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from sisaflow.core.config import Params
from sisaflow.core.errors import ExternalToolError, SisaflowError, WorkspaceError
from sisaflow.core.paths import Workspace

log = logging.getLogger("sisaflow.deletion.purge")

TEMP_DIRS = ("corpus", "shards", "models", "registry")


@dataclass(frozen=True)
class Removed:
    kind: str
    """dvc-cache | dvc-run-cache | dvc-remote | prefect-result | ray-tmp | stale-temp"""
    path: str
    bytes: int


@dataclass
class PurgeReport:
    removed: list[Removed] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    remote_not_collected: bool = False
    """A DVC remote is configured but could not be garbage-collected: it may still hold old copies, so no request
    is certified until a later purge collects it."""

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.removed:
            out[r.kind] = out.get(r.kind, 0) + r.bytes
        return out

    def to_json(self) -> dict:
        return {
            "removed": [{"kind": r.kind, "path": r.path, "bytes": r.bytes} for r in self.removed],
            "total_bytes": self.total_bytes,
            "bytes_by_kind": self.bytes_by_kind(),
            "notes": list(self.notes),
            "remote_not_collected": self.remote_not_collected,
        }

    @classmethod
    def from_json(cls, raw: dict) -> PurgeReport:
        """The report `to_json` wrote (its totals are recomputed from what was removed)."""
        return cls(
            removed=[Removed(r["kind"], r["path"], int(r["bytes"])) for r in raw.get("removed", [])],
            notes=list(raw.get("notes", [])),
            remote_not_collected=bool(raw.get("remote_not_collected", False)),
        )


# ---- helpers ----


def _within(path: Path, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return True
    except ValueError:
        return False


def _size(path: Path) -> int:
    """Bytes of the regular files at or under `path` (symlinks are not followed)."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISDIR(st.st_mode):
        return 0
    total = 0
    for dirpath, _, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _files(root: Path) -> dict[Path, int]:
    """{path: size} of every regular file under `root`."""
    out: dict[Path, int] = {}
    if not root.is_dir():
        return out
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[p] = st.st_size
    return out


def _remove(path: Path, kind: str, report: PurgeReport, allowed: list[Path]) -> None:
    """Measure, then remove `path` (file, symlink or directory) if it lies under one of `allowed`."""
    if not any(_within(path, a) for a in allowed):
        raise WorkspaceError(f"purge: refusing to remove {path}: outside {', '.join(map(str, allowed))}")
    nbytes = _size(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        report.notes.append(f"could not remove {path}: {exc.strerror or exc}")
        return
    report.removed.append(Removed(kind, str(path), nbytes))


def _prune_empty_dirs(root: Path) -> None:
    """Remove directories left empty under `root` (DVC's two-character object directories)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        if Path(dirpath) != root and not dirnames and not filenames:
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


# ---- DVC ----


def _dvc(ws: Workspace, *args: str):
    from sisaflow.core.versioning import run_tool

    return run_tool(ws, "dvc", *args)


def _dvc_cache_dir(ws: Workspace) -> Path:
    out = _dvc(ws, "cache", "dir").stdout.strip()
    return Path(out).resolve() if out else ws.root / ".dvc" / "cache"


def _gc_local(ws: Workspace, report: PurgeReport) -> None:
    cache = _dvc_cache_dir(ws)
    if not _within(cache, ws.root):
        report.notes.append(
            f"DVC cache {cache} is outside the workspace (a shared cache?): not garbage-collected; run "
            "`dvc gc --workspace` for every project that uses it"
        )
        return
    runs = cache / "runs"
    before = {p: n for p, n in _files(cache).items() if not _within(p, runs)}
    _dvc(ws, "gc", "--workspace", "--force")
    after = _files(cache)
    for p, n in sorted(before.items()):
        if p not in after:
            report.removed.append(Removed("dvc-cache", str(p), n))
    _prune_empty_dirs(cache / "files")
    if runs.exists():
        _remove(runs, "dvc-run-cache", report, [ws.root])


def _gc_remote(ws: Workspace, report: PurgeReport) -> None:
    from sisaflow.core.versioning import default_remote

    name, url, local = default_remote(ws)
    if not name:
        report.notes.append("no default DVC remote configured: nothing to collect remotely")
        return
    if not url:
        report.notes.append(f"DVC remote {name!r} has no url: skipped")
        report.remote_not_collected = True
        return
    if local is None:
        _gc_object_store(ws, report, name)
        return
    if not local.is_dir():
        report.notes.append(f"DVC remote {name!r} ({local}) does not exist yet (nothing pushed): skipped")
        return
    before = _files(local)
    if not _gc_cloud(ws, report, name, repr(name)):
        return
    after = _files(local)
    for p, n in sorted(before.items()):
        if p not in after:
            report.removed.append(Removed("dvc-remote", str(p), n))
    if (local / "runs").exists():
        report.notes.append(
            f"DVC remote {name!r} holds a run cache ({local / 'runs'}; hashes only, pushed with --run-cache): "
            "left in place"
        )


def _gc_cloud(ws: Workspace, report: PurgeReport, name: str, where: str) -> bool:
    """`dvc gc --cloud` of the remote `name`; False (noted, and no request certified) when DVC could not."""
    try:
        _dvc(ws, "gc", "--workspace", "--cloud", "--force", "-r", name)
    except ExternalToolError as exc:
        report.notes.append(f"DVC remote {where} not garbage-collected (unreachable?): {exc}")
        report.remote_not_collected = True
        return False
    return True


def _gc_object_store(ws: Workspace, report: PurgeReport, name: str) -> None:
    """`dvc gc --cloud` on a remote that is an object store (S3 through dvc-s3), measuring what it removed by
    listing the objects before and after with the same plugin. DVC's own gc decides whether the remote was
    collected: a remote it collects but sisaflow cannot list is collected, its bytes not measured."""
    from sisaflow.core.versioning import open_remote

    store, before, unlisted = None, None, ""
    try:
        store = open_remote(ws, name)
        before = store.objects()
    except Exception as exc:  # the plugin's errors (no endpoint, no bucket, denied) share no base class
        unlisted = str(exc)
    where = f"{name!r} ({store.url})" if store is not None else repr(name)
    if not _gc_cloud(ws, report, name, where):
        return
    try:
        after = store.objects() if store is not None and before is not None else None
    except Exception as exc:
        unlisted = str(exc)
        after = None
    if store is None or before is None or after is None:
        report.notes.append(
            f"DVC remote {where} collected by DVC, bytes not measured (not listed: {unlisted})"
        )
        return
    for p, n in before.items():
        if p not in after:
            report.removed.append(Removed("dvc-remote", store.url_of(p), n))
    if any(store.relative(p).startswith("runs/") for p in after):
        report.notes.append(
            f"DVC remote {where} holds a run cache ({store.url}/runs; hashes only, pushed with --run-cache): "
            "left in place"
        )


# ---- Prefect, Ray, temporary files ----


def _prefect_results(ws: Workspace, report: PurgeReport) -> None:
    env_home = os.environ.get("PREFECT_HOME")
    if env_home and Path(env_home).resolve() != ws.prefect_home.resolve():
        report.notes.append(
            f"PREFECT_HOME is {env_home}, not the workspace's: results kept there are not purged"
        )
    storage = ws.prefect_home / "storage"
    if storage.is_dir() and not storage.is_symlink():
        for p in sorted(storage.iterdir()):
            _remove(p, "prefect-result", report, [ws.root])


def _processes_naming(path: Path) -> list[str]:
    """Command lines of running processes that mention `path`."""
    import psutil

    needle = str(path)
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info.get("cmdline") or [])
        except (psutil.Error, OSError):
            continue
        if needle in cmd:
            out.append(cmd)
    return out


def _ray_tmp(ws: Workspace, report: PurgeReport) -> None:
    root = ws.ray_tmp_dir
    if not root.exists():
        return
    cmds = _processes_naming(root)
    entries = sorted(root.iterdir())
    sessions = [p for p in entries if p.name.startswith("session_") and p.name != "session_latest"]
    in_use = {s for s in sessions if any(str(s) in c for c in cmds)}
    if cmds and not in_use:
        report.notes.append(
            f"{len(cmds)} running process(es) use {root} without naming a session: Ray files left in place"
        )
        return
    for s in sessions:
        if s in in_use:
            report.notes.append(f"Ray session {s} is in use by a running process: left in place")
        else:
            _remove(s, "ray-tmp", report, [root])
    for p in entries:
        if p in sessions:
            continue
        if p.name == "session_latest":
            if p.is_symlink() and not p.exists():
                _remove(p, "ray-tmp", report, [root])
        elif not cmds:
            _remove(p, "ray-tmp", report, [root])
    if not cmds:
        try:
            root.rmdir()
        except OSError:
            pass


def _stale_temp(ws: Workspace, report: PurgeReport) -> None:
    for top in TEMP_DIRS:
        base = ws.root / top
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            d = Path(dirpath)
            stale_dirs = [n for n in dirnames if n.startswith(".") and n.endswith((".tmp", ".old"))]
            for n in stale_dirs:
                _remove(d / n, "stale-temp", report, [ws.root])
            dirnames[:] = [n for n in dirnames if n not in stale_dirs]
            for n in filenames:
                if n.startswith(".") and n.endswith(".tmp"):
                    _remove(d / n, "stale-temp", report, [ws.root])


# ---- purge ----


def purge(ws: Workspace, params: Params) -> PurgeReport:
    """Remove every side copy of superseded data (see the module docstring); return what was removed."""
    from sisaflow.core import versioning

    report = PurgeReport()
    if not ws.params_file.is_file():
        raise WorkspaceError(f"{ws.root} is not a sisaflow workspace (no params.yaml)")
    # first: a leftover temporary file inside a DVC output makes `dvc status` report it as modified
    _stale_temp(ws, report)
    has_dvc = (ws.root / ".dvc").is_dir()
    if has_dvc:
        pending = versioning.status(ws)
        # a dependency newer than the lock (a request recorded since the last run) is fine: what gc keeps is
        # what dvc.lock names as the outputs, and those must be the current ones
        if not versioning.outputs_recorded(pending):
            raise WorkspaceError(
                "dvc status is not clean ("
                + ", ".join(sorted(pending))
                + "): dvc.lock does not describe the "
                "current outputs, so purging would keep the wrong data; finish the run (`sisaflow run`) first"
            )
    try:
        from sisaflow.deletion.requests import pending_requests

        open_requests = [r.request_id for r in pending_requests(ws)]
    except SisaflowError:
        open_requests = []
    if open_requests:
        report.notes.append(
            "deletion request(s) not applied yet (their records are still in the current outputs): "
            + ", ".join(open_requests[:10])
        )

    if has_dvc:
        _gc_local(ws, report)
        _gc_remote(ws, report)
    else:
        report.notes.append("no .dvc directory: no DVC cache or remote to collect")
    _prefect_results(ws, report)
    _ray_tmp(ws, report)
    log.info("purge removed %d item(s), %d bytes", len(report.removed), report.total_bytes)
    return report
