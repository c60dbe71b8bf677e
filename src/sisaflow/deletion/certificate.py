"""Deletion certificates: what a privacy engineer hands an auditor to show a request was carried out.

A certificate is one JSON object (format `sisaflow-deletion-certificate/1`) recording the request (counts only),
the timeline of its states, the content hashes removed, the shards and slices retrained, the retired and new
checkpoint weight hashes, what was purged, what the post-deletion scan found, and the code, params and ensemble
that did it. It never holds an owner id, a record id or record text: `build_certificate` keeps only counts,
hashes and numbers, redacts named ids from the reason, and refuses to return a certificate that still holds one.

Signing is HMAC-SHA256 over the canonical JSON (sorted keys, no whitespace, UTF-8) of the certificate without
its `signature` field. The key is the UTF-8 bytes of SISAFLOW_CERTIFICATE_KEY, used as they are (no hex
decoding), so `export SISAFLOW_CERTIFICATE_KEY=$(openssl rand -hex 32)` gives a 64-byte key. Whoever holds the
key can both sign and verify: keep it where the auditor's verifier, not the operator, controls it.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from sisaflow.certificate_html import render_html
from sisaflow.certificate_schema import ALG, FORMAT, NAME, check_certificate
from sisaflow.errors import SisaflowError
from sisaflow.fsio import read_json, write_text

KEY_ENV = "SISAFLOW_CERTIFICATE_KEY"
REDACTED = "[redacted]"


class CertificateError(SisaflowError):
    """A certificate cannot be built, written or read as asked (bad input, an id that would leak)."""


# ---- canonical form and signing ----


def canonical_json(obj: Any) -> bytes:
    """The bytes that are hashed and signed: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _mac(cert: dict, key: bytes) -> str:
    body = {k: v for k, v in cert.items() if k != "signature"}
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def sign(cert: dict, key: bytes) -> dict:
    """A copy of `cert` with signature {"alg": "HMAC-SHA256", "value": hex} over everything else."""
    if not key:
        raise CertificateError("an empty key cannot sign a certificate")
    return {**cert, "signature": {"alg": ALG, "value": _mac(cert, key)}}


def verify_signature(cert: dict, key: bytes) -> bool:
    """True when `cert` carries an HMAC-SHA256 signature that `key` reproduces (constant-time compare)."""
    sig = cert.get("signature")
    if not key or not isinstance(sig, dict) or sig.get("alg") != ALG or not isinstance(sig.get("value"), str):
        return False
    return hmac.compare_digest(sig["value"], _mac(cert, key))


def key_from_env() -> bytes | None:
    """The signing key: the UTF-8 bytes of $SISAFLOW_CERTIFICATE_KEY as they are; None when unset or empty."""
    value = os.environ.get(KEY_ENV, "")
    return value.encode("utf-8") if value else None


# ---- provenance ----


def _git(cwd: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_version(repo_root: Path | None = None) -> str:
    """The git commit of the sisaflow code in use, "-dirty" when src/ has uncommitted changes; else the
    package version. `repo_root` is a directory of the sisaflow checkout (default: the imported package's)."""
    from sisaflow import __version__

    where = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parent
    top = _git(where, "rev-parse", "--show-toplevel") if where.is_dir() else None
    # a package installed inside some other repository (a venv in a workspace) is not a sisaflow checkout
    if not top or not _git(where, "ls-files", "--", "."):
        return __version__
    commit = _git(where, "rev-parse", "HEAD")
    if not commit:
        return __version__
    scope = "src" if (Path(top) / "src").is_dir() else str(where.resolve())
    changes = _git(Path(top), "status", "--porcelain", "--", scope)
    return commit + ("-dirty" if changes is None or changes else "")


def params_hash(params_file: Path) -> str:
    """sha256 of the canonical JSON of the loaded, validated params (defaults filled in)."""
    from sisaflow.config import Params

    return hashlib.sha256(canonical_json(Params.load(Path(params_file)).to_dict())).hexdigest()


# ---- building ----


def _count(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return len({str(v) for v in value})
    if value is None:
        return 0
    raise CertificateError(f"request {what}: expected a count or a list of ids, got {type(value).__name__}")


def _ids(request: dict) -> set[str]:
    out: set[str] = set()
    for key in ("owners", "records"):
        value = request.get(key)
        if isinstance(value, (list, tuple, set, frozenset)):
            out.update(str(v) for v in value if str(v))
    return out


def _redact(text: str, ids: set[str]) -> str:
    # longest first, so an id that contains another is redacted whole
    for ident in sorted(ids, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(ident)}(?![A-Za-z0-9])", REDACTED, text)
    return text


def _clean_request(request: dict) -> dict:
    ids = _ids(request)
    reason = request.get("reason")
    owners = request.get("owner_count", request.get("owners"))
    records = request.get("record_count", request.get("records"))
    return {
        "request_id": request.get("request_id"),
        "owner_count": _count(owners, "owners"),
        "record_count": _count(records, "records"),
        "requested_at": request.get("requested_at"),
        "reason": None if reason in (None, "") else _redact(str(reason), ids),
    }


def _clean_purge(report: dict, depth: int = 0) -> dict:
    """Numbers (bytes per kind), flags and nested groups of them; strings and lists (paths, ids) are dropped."""
    out: dict[str, Any] = {}
    for key, value in report.items():
        if not isinstance(key, str) or not NAME.fullmatch(key):
            continue
        if isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
            out[key] = value
        elif isinstance(value, dict) and depth < 2:
            out[key] = _clean_purge(value, depth + 1)
    return out


def _location_kind(finding: Any) -> str:
    """The kind of place a finding is in (`corpus`, `shards`, `logs` ...): a path keeps its first part only."""
    if isinstance(finding, dict):
        loc = finding.get("location")
        kind = loc.get("kind") if isinstance(loc, dict) else finding.get("location_kind", loc)
        if isinstance(kind, str):
            kind = re.split(r"[/\\:]", kind, maxsplit=1)[0]
            if NAME.fullmatch(kind):
                return kind
    return "other"


def _clean_verify(result: dict) -> dict:
    """{clean, findings, findings_by_location}: counts by kind of location, never a finding's text or path."""
    by_kind: dict[str, int] = {}
    given = result.get("findings_by_location")
    findings = result.get("findings")
    if isinstance(given, dict):
        for kind, n in given.items():
            name = kind if isinstance(kind, str) and NAME.fullmatch(kind) else "other"
            by_kind[name] = by_kind.get(name, 0) + _count(n, "verify findings")
    elif isinstance(findings, list):
        for f in findings:
            kind = _location_kind(f)
            by_kind[kind] = by_kind.get(kind, 0) + 1
    total = (
        sum(by_kind.values()) if by_kind or not isinstance(findings, int) else _count(findings, "findings")
    )
    clean = total == 0 and result.get("clean", True) is not False
    out = {"clean": clean, "findings": total, "findings_by_location": dict(sorted(by_kind.items()))}
    unsearched = result.get("not_searched")
    if isinstance(unsearched, dict):
        out["not_searched"] = {
            k: _count(n, "not_searched")
            for k, n in sorted(unsearched.items())
            if isinstance(k, str) and NAME.fullmatch(k)
        }
    if "source_holds" in result:
        holds = result["source_holds"]
        out["source_holds"] = None if holds is None else _count(holds, "source_holds")
    return out


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (k, *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def build_certificate(
    *,
    request: dict,
    states: list[dict],
    content_hashes: list[str],
    affected: list[dict],
    retired_checkpoints: dict[str, str],
    new_checkpoints: dict[str, str],
    purge_report: dict | None,
    verify_result: dict | None,
    code_version: str,
    params_hash: str,
    ensemble_version: str,
    issued_at: str,
    training_environments: dict[str, list[dict[str, str]]] | None = None,
) -> dict:
    """An unsigned certificate (signature null) after checking every field; pass it to `sign` to sign it.

    `request` may be a ledger entry with owner and record ids: they become counts, any other key is dropped, and
    a named id inside the reason is replaced by "[redacted]". A CertificateError names the first bad field, and
    is raised too if any named id would still appear in the certificate (e.g. as the request id)."""
    if not isinstance(request, dict):
        raise CertificateError("request: expected a mapping")
    cert: dict[str, Any] = {
        "format": FORMAT,
        "request": _clean_request(request),
        "states": [
            {"state": s.get("state"), "at": s.get("at")} if isinstance(s, dict) else s for s in states
        ],
        "content_hashes": list(content_hashes),
        "affected": [
            {
                "shard": a.get("shard"),
                "from_slice": a.get("from_slice"),
                "slices": list(a.get("slices") or []),
            }
            if isinstance(a, dict)
            else a
            for a in affected
        ],
        "retired_checkpoints": dict(retired_checkpoints),
        "new_checkpoints": dict(new_checkpoints),
        "purge_report": None if purge_report is None else _clean_purge(dict(purge_report)),
        "verify_result": None if verify_result is None else _clean_verify(dict(verify_result)),
        "code_version": code_version,
        "params_hash": params_hash,
        "ensemble_version": ensemble_version,
        "issued_at": issued_at,
        "signature": None,
    }
    if training_environments:  # a copy of whatever was given: check_certificate names what is wrong in it
        cert["training_environments"] = copy.deepcopy(training_environments)
    problem = check_certificate(cert)
    if problem:
        raise CertificateError(problem)
    # checked first, so sorting meets only well-typed values
    cert["content_hashes"] = sorted(set(cert["content_hashes"]))
    for a in cert["affected"]:
        a["slices"] = sorted(set(a["slices"]))
    cert["affected"].sort(key=lambda a: (a["shard"], a["from_slice"]))
    for name in ("retired_checkpoints", "new_checkpoints"):
        cert[name] = dict(sorted(cert[name].items()))
    leaked = _ids(request) & set(_strings(cert))
    if leaked:
        raise CertificateError(
            f"request {cert['request']['request_id']}: {len(leaked)} owner/record id(s) would appear in the "
            "certificate (for example as its request id); certificates carry counts and hashes only"
        )
    return cert


def verify_file(path: Path, key: bytes | None) -> tuple[bool, str]:
    """(valid, message) for a certificate file: well-formed, of a known format, and signed with `key`.

    Only a signature the key reproduces makes a certificate valid: an unsigned one, or a signed one checked
    without a key, is reported as such and is not valid."""
    try:
        cert = read_json(Path(path))
    except (OSError, UnicodeDecodeError) as exc:
        return False, f"cannot read {path}: {exc}"
    except json.JSONDecodeError as exc:
        return False, f"malformed certificate: not JSON ({exc})"
    problem = check_certificate(cert)
    if problem:
        return False, f"malformed certificate: {problem}"
    if cert["signature"] is None:
        return False, "unsigned: the certificate carries no signature, so nothing shows it is unchanged"
    if not key:
        return False, f"signed, but no key to check it with: set {KEY_ENV}"
    if not verify_signature(cert, key):
        return False, "signature does not match: the certificate was changed or the key differs"
    return True, f"valid: {ALG} signature matches; request {cert['request']['request_id']}"


# ---- writing ----


def write_certificate(directory: Path, cert: dict) -> tuple[Path, Path]:
    """Write <request_id>.json (sorted, indented) and a self-contained <request_id>.html; returns both paths."""
    problem = check_certificate(cert)
    if problem:
        raise CertificateError(f"malformed certificate: {problem}")
    rid = cert["request"]["request_id"]
    json_path, html_path = Path(directory) / f"{rid}.json", Path(directory) / f"{rid}.html"
    write_text(json_path, json.dumps(cert, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    write_text(html_path, render_html(cert))
    return json_path, html_path
