"""Search every place a deleted record could still be copied: text, content hash or record id.

`scan` looks in every file of the workspace (raw bytes, and decoded: Parquet string columns, gzip/lzma/bz2/zlib
streams, base64 payloads inside JSON such as Prefect's persisted results), in every object of the workspace's
git repository (all commits, reachable or not; sisaflow.scan.history), in the DVC cache, in the DVC remote (a
local directory, or an object store such as S3 read through DVC's own plugin), in the Prefect homes and storage
this environment's Prefect uses (sisaflow.scan.prefect_home) and in Ray's temporary directory for the workspace.
A remote or Prefect place that cannot be reached or read is counted as not searched. It finds:

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
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sisaflow.core import versioning
from sisaflow.core.config import Params
from sisaflow.core.errors import SisaflowError
from sisaflow.core.paths import Workspace
from sisaflow.scan.formats import CHUNK, search_handle
from sisaflow.scan.history import git_object_bytes, scan_git
from sisaflow.scan.prefect_home import prefect_places
from sisaflow.scan.progress import Progress, ProgressCallback
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


@dataclass(frozen=True)
class _File:
    """One file or object to search: how to open it, how findings name it, its size."""

    label: str
    size: int
    path: Path | None = None
    key: str = ""
    """The object's path in `store`, for a DVC remote in an object store."""
    store: versioning.RemoteStore | None = None
    text_only: bool = False

    def open(self) -> BinaryIO:
        if self.store is not None:
            return self.store.open(self.key)
        assert self.path is not None
        return open(self.path, "rb")


def _walk_files(
    root: Path, prune: set[Path], excluded: set[Path], report: ScanReport, label
) -> Iterator[tuple[Path, int]]:
    """(path, size) of the regular files under `root` (symlinks not followed), minus pruned directories and
    excluded files."""
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
                # not followed: a target inside the tree is scanned where it lies (DVC's symlink caches); one
                # outside it is named, since nothing else searches it
                target = p.resolve()
                if not target.is_relative_to(root.resolve()) and target.is_file():
                    report.skipped.append(
                        f"{label(p)}: a symbolic link to a file outside {root}: not followed"
                    )
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size > MAX_FILE_BYTES:
                report.skipped.append(f"{label(p)}: {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte limit")
                continue
            yield p, st.st_size


def _tree(
    root: Path,
    prefix: str,
    report: ScanReport,
    prune: set[Path] = frozenset(),  # type: ignore[assignment]
    excluded: set[Path] = frozenset(),  # type: ignore[assignment]
    text_only: set[Path] = frozenset(),  # type: ignore[assignment]
) -> list[_File]:
    """The files to search under `root` (a directory, or one file), labelled `prefix` + their relative path."""
    if root.is_file():
        return [_File(prefix + root.as_posix(), root.stat().st_size, path=root)]
    if not root.is_dir():
        return []

    def label(p: Path) -> str:
        return prefix + p.relative_to(root).as_posix()

    return [
        _File(label(p), size, path=p, text_only=any(_within(p, d) for d in text_only))
        for p, size in _walk_files(root, set(prune), set(excluded), report, label)
    ]


def _store(store: versioning.RemoteStore, report: ScanReport) -> list[_File] | None:
    """The objects of a DVC remote in an object store; None (counted as not searched) when it cannot be
    listed."""
    try:
        objects = store.objects()
    except Exception as exc:  # the plugin's errors (no endpoint, no bucket, denied) share no base class
        report.not_searchable(
            "dvc-remote", f"DVC remote {store.name!r} ({store.url}) cannot be listed ({exc}): not searched"
        )
        return None
    out = []
    for key, size in objects.items():
        label = "dvc-remote:" + store.relative(key)
        if size > MAX_FILE_BYTES:
            report.skipped.append(f"{label}: {size} bytes, over the {MAX_FILE_BYTES}-byte limit")
        else:
            out.append(_File(label, size, key=key, store=store))
    return out


def _search(
    files: list[_File],
    nd: Needles,
    targets: list[Target],
    report: ScanReport,
    seen: dict[bytes, set],
    retired: RetiredFiles,
    progress: Progress,
) -> None:
    for f in files:
        try:
            with f.open() as fh:
                hits = search_handle(fh, f.size, nd, report, f.label, seen)
            if f.text_only:
                hits = {h for h in hits if h[1] == "text"}
            report.add(targets, hits, f.label)
            retired.check(report, f.label, f.size, lambda f=f: _digest(f))
        except Exception as exc:
            if f.store is None and not isinstance(exc, OSError):
                raise
            if f.store is None and isinstance(exc, FileNotFoundError):
                # listed, then removed before its turn (a temporary file): nothing of it is left to find
                report.notes.append(f"{f.label}: removed while the scan ran")
            else:
                # an object store's read errors (the plugin's) share no base class with OSError
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                report.skipped.append(f"{f.label}: unreadable ({reason})")
        progress.advance(f.size)


def _digest(f: _File) -> str:
    digest = hashlib.sha256()
    with f.open() as fh:  # streamed: a model's weights can be larger than memory allows
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _dvc_places(
    ws: Workspace, report: ScanReport
) -> tuple[Path | None, Path | versioning.RemoteStore | None]:
    """(DVC cache directory, DVC remote: a local directory or an object store), each None when there is
    none or (for the remote) when it cannot be opened, which is counted as not searched."""
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
    name, url, local = versioning.default_remote(ws)
    if not name:
        report.notes.append("no default DVC remote configured")
        return cache, None
    if local is not None:
        return cache, local
    if not url:
        report.not_searchable("dvc-remote", f"DVC remote {name!r} has no url: not searched")
        return cache, None
    try:
        return cache, versioning.open_remote(ws, name)
    except SisaflowError as exc:
        report.not_searchable("dvc-remote", f"{exc}: not searched")
        return cache, None


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
    progress: ProgressCallback | None = None,
) -> ScanReport:
    """Search every place for `targets`, and for the retired checkpoints' files (weights, optimizer state)
    `retired_files` names ({sha256: RetiredFile}); the findings plus what was excluded, skipped and noted.
    `progress(done, total)` is called with the bytes searched after each file, remote object and git
    object (see sisaflow.scan.progress)."""
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

    cache, remote = _dvc_places(ws, report)
    prefect = prefect_places(ws, report)
    prune = {ws.prefect_home.resolve(), *(p.path for p in prefect)}
    # Python virtual environments inside the workspace (the repository's own .venv): installed packages,
    # where sisaflow never writes data
    for child in sorted(ws.root.iterdir()):
        if child.is_dir() and (child / "pyvenv.cfg").is_file():
            prune.add(child.resolve())
            report.excluded.append(f"{child} (a Python virtual environment: installed packages only)")
    for d in (cache, remote):
        if isinstance(d, Path):
            prune.add(d.resolve())

    # list every place first, so that progress knows the total
    files = _tree(ws.root, "", report, prune=prune, excluded={source, *inputs}, text_only=text_only)
    if cache is not None:
        files += _tree(cache, "dvc-cache:", report)
    if isinstance(remote, Path):
        if remote.is_dir():
            files += _tree(remote, "dvc-remote:", report)
        else:
            report.notes.append(f"DVC remote {remote} does not exist (nothing pushed yet)")
    elif remote is not None:
        files += _store(remote, report) or []
    for place in prefect:
        files += _tree(place.path, place.prefix, report)
    if ws.ray_tmp_dir.is_dir():
        files += _tree(ws.ray_tmp_dir, "ray-tmp:", report)
    tracker = Progress(progress)
    tracker.plan(sum(f.size for f in files) + git_object_bytes(ws))
    tracker.advance(0)  # the total, before the first search

    seen: dict[bytes, set] = {}  # content digest -> hits: each distinct content is searched once
    _search(files, nd, targets, report, seen, retired, tracker)
    scan_git(ws, nd, targets, report, excluded_rel, list(HASH_ONLY_DIRS), retired, tracker)
    report.findings = sorted(set(report.findings), key=lambda f: (f.request_id, f.where, f.what, f.record_id))
    return report


def scan(ws: Workspace, params: Params, targets: list[Target]) -> list[Finding]:
    """Every copy of `targets` left anywhere (see the module docstring); empty when none is."""
    return scan_report(ws, params, targets).findings
