"""Search every place a deleted record could still be copied: text, content hash or record id.

`scan` looks in every file of the workspace (raw bytes, and decoded: Parquet string columns, gzip/lzma/bz2/zlib
streams, base64 payloads inside JSON such as Prefect's persisted results), in every object of the workspace's
git repository (all commits, reachable or not), in the DVC cache, in the DVC remote when it is a local
directory, in the Prefect home and in Ray's temporary directory for the workspace. It finds:

- 'text': the record's text (UTF-8, and as it reads inside JSON), or a distinctive piece of it (a template field
  or line of at least MIN_DISTINCT characters that no kept record of the source contains), so that a copy in
  another layout (the source's own fields, a JSON dump) is found too;
- 'content_hash': the record's content hash (64 hex digits);
- 'record_id': the record's id, as a whole token (in Parquet string columns: an exact value);
- 'weights' / 'optimizer-state': a byte-for-byte copy of the weights file or of the optimizer state (AdamW's
  moments, running sums of the records' gradients) of a checkpoint the request retired (trained on its records),
  as its impact record names them (sisaflow.deletion.impact).

Exclusions. The deletion ledger (deletions/) and deletion certificates (reports/certificates/) legitimately hold
ids and content hashes, so there (in the working tree and in git history, and in ledger-shaped git objects no
commit references) only text is reported. The corpus source named in params (the user's own input, which
sisaflow never writes), and the evaluation inputs named in params (evaluate.holdout, evaluate.tofu_perturbed),
are not searched at all, in the working tree or in git history. The report lists both.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from sisaflow.core import versioning
from sisaflow.core.config import Params
from sisaflow.core.errors import SisaflowError
from sisaflow.core.paths import Workspace
from sisaflow.scan.formats import IN_MEMORY_BYTES, Limited, drain, search_bytes, search_file, search_stream
from sisaflow.scan.targets import (
    Finding,
    Needles,
    RetiredFile,
    RetiredFiles,
    ScanReport,
    Target,
    build_needles,
    kept_texts,
    targets_from_source,
    text_pieces,
)

__all__ = [
    "Finding",
    "ScanReport",
    "Target",
    "remote_dir",
    "scan",
    "scan_report",
    "targets_from_source",
    "text_pieces",
]

MAX_FILE_BYTES = 2 << 30
"""Larger files are skipped, with a note."""
HASH_ONLY_DIRS = ("deletions", "reports/certificates")
"""Places that legitimately hold ids and content hashes (the ledger, certificates): only text is reported there."""


# ---- places ----


def _add(report: ScanReport, targets: list[Target], hits: set[tuple[int, str]], where: str) -> None:
    for i, what in sorted(hits):
        t = targets[i]
        report.findings.append(Finding(t.request_id, where, what, t.record_id))


def _walk_files(
    root: Path, prune: set[Path], excluded: set[Path], report: ScanReport, label
) -> Iterator[Path]:
    """Regular files under `root` (symlinks not followed), minus pruned directories and excluded files."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = [n for n in sorted(dirnames) if n != ".git" and d / n not in prune]
        for name in sorted(filenames):
            p = d / name
            if p in excluded:
                continue
            try:
                st = p.lstat()
            except OSError as exc:
                report.skipped.append(f"{label(p)}: unreadable ({exc.strerror})")
                continue
            if stat.S_ISLNK(st.st_mode):
                continue  # the target is scanned where it lives (DVC symlink/hardlink caches are scanned too)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size > MAX_FILE_BYTES:
                report.skipped.append(f"{label(p)}: {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte limit")
                continue
            yield p


def _scan_tree(
    root: Path,
    prefix: str,
    nd: Needles,
    targets: list[Target],
    report: ScanReport,
    prune: set[Path] = frozenset(),  # type: ignore[assignment]
    excluded: set[Path] = frozenset(),  # type: ignore[assignment]
    text_only: set[Path] = frozenset(),  # type: ignore[assignment]
    seen: dict[bytes, set] | None = None,
    retired: RetiredFiles | None = None,
) -> None:
    if not root.is_dir():
        return

    def label(p: Path) -> str:
        return prefix + p.relative_to(root).as_posix()

    for p in _walk_files(root, set(prune), set(excluded), report, label):
        try:
            hits = search_file(p, nd, report, label(p), seen)
        except OSError as exc:
            report.skipped.append(f"{label(p)}: unreadable ({exc.strerror or exc})")
            continue
        if any(_within(p, d) for d in text_only):
            hits = {h for h in hits if h[1] == "text"}
        _add(report, targets, hits, label(p))
        if retired is not None:
            retired.check(report, label(p), p.stat().st_size, lambda p=p: RetiredFiles.file_digest(p))


def _dvc_dirs(ws: Workspace, report: ScanReport) -> tuple[Path | None, Path | None]:
    """(DVC cache directory, local DVC remote directory), each None when there is none."""
    if not (ws.root / ".dvc").is_dir():
        report.notes.append("no .dvc directory: no DVC cache or remote to search")
        return None, None
    cache: Path | None = ws.root / ".dvc" / "cache"
    try:
        out = versioning.run_tool(ws, "dvc", "cache", "dir").stdout.strip()
        if out:
            cache = Path(out)
    except SisaflowError as exc:
        report.notes.append(f"`dvc cache dir` failed ({exc}); searching .dvc/cache")
    remote = remote_dir(ws, report)
    return cache, remote


def remote_dir(ws: Workspace, report: ScanReport) -> Path | None:
    """The default DVC remote's directory when it is local; None (with a note) otherwise."""
    name, url, local = versioning.default_remote(ws)
    if not name:
        report.notes.append("no default DVC remote configured")
    elif local is None:
        report.notes.append(f"DVC remote {name!r} ({url or 'no url'}) is not a local directory: not searched")
        report.unsearched["dvc-remote"] = 1
    return local


# ---- git ----


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


def _scan_git(
    ws: Workspace,
    nd: Needles,
    targets: list[Target],
    report: ScanReport,
    excluded: list[str],
    text_only: list[str],
    retired: RetiredFiles | None = None,
) -> None:
    """Every object of the repository (commits, tags, blobs; reachable or not, loose or packed). `excluded` and
    `text_only` are paths relative to the workspace."""
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
        _add(report, targets, hits, where)


# ---- the scan ----


def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def scan_report(
    ws: Workspace,
    params: Params,
    targets: list[Target],
    retired_files: Mapping[str, RetiredFile] | None = None,
) -> ScanReport:
    """Search every place for `targets`, and for the retired checkpoints' files (weights, optimizer state)
    `retired_files` names ({sha256: RetiredFile}); the findings plus what was excluded, skipped and noted."""
    report = ScanReport()
    targets = list(targets)
    if not targets:
        report.notes.append("no targets")
        return report
    kept = kept_texts(ws, params, {t.content_hash for t in targets}, report)
    retired = RetiredFiles(retired_files or {})
    nd = build_needles(targets, params.corpus.text_template, kept, report)

    source = ws.source(params.corpus.path).resolve()
    # evaluation inputs named in params are the user's files too (TOFU's perturbed file holds the forget set's
    # questions and answers by design); like the corpus source, sisaflow never writes them
    inputs = [ws.source(p).resolve() for p in (params.evaluate.holdout, params.evaluate.tofu_perturbed) if p]
    report.excluded += [
        "deletions/ (the deletion ledger; in git history too): ids and content hashes allowed, text reported",
        "reports/certificates/ (deletion certificates; in git history too): ids and content hashes allowed, "
        "text reported",
        "ledger-shaped git objects no commit references: ids and content hashes allowed, text reported",
        f"{source} (the corpus source: the user's input, which sisaflow never writes; in git history too)",
        *[
            f"{p} (an evaluation input named in params: the user's file, never written; in git history too)"
            for p in inputs
        ],
    ]
    report.unsearched["corpus-source"] = 1
    if inputs:
        report.unsearched["evaluation-input"] = len(inputs)
    excluded_rel = [p.relative_to(ws.root).as_posix() for p in (source, *inputs) if _within(p, ws.root)]
    text_only = {ws.root / d for d in HASH_ONLY_DIRS}

    cache, remote = _dvc_dirs(ws, report)
    prune = {ws.prefect_home.resolve()}
    # Python virtual environments inside the workspace (the repository's own .venv): installed packages,
    # where sisaflow never writes data
    for child in sorted(ws.root.iterdir()):
        if child.is_dir() and (child / "pyvenv.cfg").is_file():
            prune.add(child.resolve())
            report.excluded.append(f"{child} (a Python virtual environment: installed packages only)")
    for d in (cache, remote):
        if d is not None:
            prune.add(d.resolve())

    seen: dict[bytes, set] = {}  # content digest -> hits: each distinct content is searched once
    _scan_tree(
        ws.root,
        "",
        nd,
        targets,
        report,
        prune=prune,
        excluded={source, *inputs},
        text_only=text_only,
        seen=seen,
        retired=retired,
    )
    if cache is not None:
        _scan_tree(cache, "dvc-cache:", nd, targets, report, seen=seen, retired=retired)
    if remote is not None:
        if remote.is_dir():
            _scan_tree(remote, "dvc-remote:", nd, targets, report, seen=seen, retired=retired)
        else:
            report.notes.append(f"DVC remote {remote} does not exist (nothing pushed yet)")
    _scan_tree(ws.prefect_home, "prefect-home:", nd, targets, report, seen=seen, retired=retired)
    if ws.ray_tmp_dir.is_dir():
        _scan_tree(ws.ray_tmp_dir, "ray-tmp:", nd, targets, report, seen=seen, retired=retired)
    _scan_git(ws, nd, targets, report, excluded_rel, list(HASH_ONLY_DIRS), retired)
    report.findings = sorted(set(report.findings), key=lambda f: (f.request_id, f.where, f.what, f.record_id))
    return report


def scan(ws: Workspace, params: Params, targets: list[Target]) -> list[Finding]:
    """Every copy of `targets` left anywhere (see the module docstring); empty when none is."""
    return scan_report(ws, params, targets).findings
