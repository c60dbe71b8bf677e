"""Searching a workspace's git repository: every object (commits, tags, blobs; reachable or not, loose or packed),
so a deleted record committed once and removed since is still found, and so is a blob no commit references."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from sisaflow.core import versioning
from sisaflow.core.paths import Workspace
from sisaflow.scan.formats import IN_MEMORY_BYTES, Limited, drain, search_bytes, search_stream
from sisaflow.scan.progress import Progress
from sisaflow.scan.targets import Needles, RetiredFiles, ScanReport, Target


def _git(ws: Workspace, *args: str) -> subprocess.CompletedProcess:
    return versioning.git(ws, *args)


def _ledger_shaped(data: bytes) -> bool:
    """A ledger file's content (JSON lines with a request_id each), e.g. an uncommitted ledger blob."""
    lines = [ln for ln in data.splitlines() if ln.strip()]
    try:
        return bool(lines) and all(
            isinstance(o := json.loads(ln), dict) and "request_id" in o for ln in lines
        )
    except ValueError:
        return False


def git_object_bytes(ws: Workspace) -> int:
    """The bytes of every object in the workspace's git repository (0 outside one): what `scan_git` reads."""
    proc = _git(ws, "cat-file", "--batch-all-objects", "--batch-check=%(objectsize)")
    if proc.returncode != 0:
        return 0
    return sum(int(x) for x in proc.stdout.split())


def scan_git(
    ws: Workspace,
    nd: Needles,
    targets: list[Target],
    report: ScanReport,
    excluded: list[str],
    text_only: list[str],
    retired: RetiredFiles | None = None,
    progress: Progress | None = None,
) -> None:
    """Every object of the repository (commits, tags, blobs; reachable or not, loose or packed). `excluded` and
    `text_only` are paths relative to the workspace."""
    progress = progress or Progress()
    top = _git(ws, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        report.notes.append("the workspace is not in a git repository: no git history to search")
        return
    root = Path(top.stdout.decode().strip()).resolve()

    def rel(paths: list[str]) -> list[str]:
        return [Path(os.path.relpath(ws.root / e, root)).as_posix() for e in paths]

    excluded_git, text_only_git = rel(excluded), rel(text_only)
    # blob -> first path seen, for everything reachable from refs and reflogs
    paths: dict[str, str] = {}
    listing = _git(ws, "rev-list", "--all", "--reflog", "--objects")
    for line in listing.stdout.decode("utf-8", "replace").splitlines():
        sha, _, path = line.partition(" ")
        if path and sha not in paths:
            paths[sha] = path

    def under(path: str, places: list[str]) -> bool:
        return any(path == e or path.startswith(e.rstrip("/") + "/") for e in places)

    hits_by_object: dict[str, tuple[str, set[tuple[int, str]]]] = {}
    proc = subprocess.Popen(
        ["git", "cat-file", "--batch-all-objects", "--batch", "--unordered"],
        cwd=ws.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    out = proc.stdout
    try:
        while True:
            header = out.readline()
            if not header:
                break
            sha_b, kind_b, size_b = header.split()
            sha, kind, size = sha_b.decode(), kind_b.decode(), int(size_b)
            skip = kind == "tree" or (sha in paths and under(paths[sha], excluded_git))
            only_text = sha in paths and under(paths[sha], text_only_git)
            hits: set[tuple[int, str]] = set()
            if skip:
                drain(out, size)
            elif size > IN_MEMORY_BYTES:
                hits = search_stream(Limited(out, size), nd)
            else:
                data = out.read(size)
                hits = search_bytes(data, nd, report.notes, f"git object {sha}")
                only_text = only_text or (bool(hits) and sha not in paths and _ledger_shaped(data))
                if retired is not None and kind == "blob":
                    where = f"git:{sha}:{paths[sha]}" if sha in paths else f"git:unreachable:{sha}"
                    retired.check(report, where, size, lambda d=data: hashlib.sha256(d).hexdigest())
            out.read(1)  # the newline after each object
            report.git_objects_scanned += 1
            progress.advance(size)
            if only_text:
                hits = {h for h in hits if h[1] == "text"}
            if hits:
                hits_by_object[sha] = (kind, hits)
    finally:
        out.close()
        proc.wait()
    for sha, (kind, hits) in sorted(hits_by_object.items()):
        if kind == "commit":
            where = f"git:{sha}:(commit message)"
        elif kind == "tag":
            where = f"git:{sha}:(tag)"
        elif sha in paths:
            log_ = _git(ws, "log", "--all", "--reflog", "--format=%H", f"--find-object={sha}")
            commits = log_.stdout.decode().split()
            where = f"git:{commits[-1] if commits else 'unknown'}:{paths[sha]}"
        else:
            where = f"git:unreachable:{sha}"
        report.add(targets, hits, where)
