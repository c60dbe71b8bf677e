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

import hashlib
import hmac
import json
import math
import os
import re
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from sisaflow.certificate_html import render_html
from sisaflow.errors import SisaflowError
from sisaflow.fsio import read_json, write_text

FORMAT = "sisaflow-deletion-certificate/1"
ALG = "HMAC-SHA256"
KEY_ENV = "SISAFLOW_CERTIFICATE_KEY"
STATES = ("pending", "excluded", "retrained", "purged", "certified")
REDACTED = "[redacted]"
FIELDS = (
    "format",
    "request",
    "states",
    "content_hashes",
    "affected",
    "retired_checkpoints",
    "new_checkpoints",
    "purge_report",
    "verify_result",
    "code_version",
    "params_hash",
    "ensemble_version",
    "issued_at",
    "signature",
)
REQUEST_FIELDS = ("request_id", "owner_count", "record_count", "requested_at", "reason")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHECKPOINT = re.compile(r"shard-(\d+)/slice-(\d+)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
"""Request ids, ensemble versions, code versions and report kinds: short names, safe as a file name."""


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
        if not isinstance(key, str) or not _NAME.fullmatch(key):
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
            if _NAME.fullmatch(kind):
                return kind
    return "other"


def _clean_verify(result: dict) -> dict:
    """{clean, findings, findings_by_location}: counts by kind of location, never a finding's text or path."""
    by_kind: dict[str, int] = {}
    given = result.get("findings_by_location")
    findings = result.get("findings")
    if isinstance(given, dict):
        for kind, n in given.items():
            name = kind if isinstance(kind, str) and _NAME.fullmatch(kind) else "other"
            by_kind[name] = by_kind.get(name, 0) + _count(n, "verify findings")
    elif isinstance(findings, list):
        for f in findings:
            kind = _location_kind(f)
            by_kind[kind] = by_kind.get(kind, 0) + 1
    total = (
        sum(by_kind.values()) if by_kind or not isinstance(findings, int) else _count(findings, "findings")
    )
    clean = total == 0 and result.get("clean", True) is not False
    return {"clean": clean, "findings": total, "findings_by_location": dict(sorted(by_kind.items()))}


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


# ---- checking ----


def _is_time(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_checkpoints(name: str, value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"{name}: expected a mapping of shard-N/slice-K to sha256"
    for key, digest in value.items():
        if not isinstance(key, str) or not _CHECKPOINT.fullmatch(key):
            return f"{name}: {key!r} is not a checkpoint name shard-N/slice-K"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"{name}[{key}]: not a sha256 hex digest"
    return None


def _check_purge(value: Any, where: str = "purge_report") -> str | None:
    if not isinstance(value, dict):
        return f"{where}: expected a mapping"
    for key, v in value.items():
        if not isinstance(key, str) or not _NAME.fullmatch(key):
            return f"{where}: {key!r} is not a kind name"
        if isinstance(v, dict):
            problem = _check_purge(v, f"{where}.{key}")
            if problem:
                return problem
        elif not isinstance(v, (bool, int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            return f"{where}.{key}: expected a finite number"
    return None


def _check_verify(value: Any) -> str | None:
    if not isinstance(value, dict) or set(value) != {"clean", "findings", "findings_by_location"}:
        return "verify_result: expected clean, findings and findings_by_location"
    by_kind = value["findings_by_location"]
    if (
        not isinstance(value["clean"], bool)
        or not _is_count(value["findings"])
        or not isinstance(by_kind, dict)
    ):
        return "verify_result: clean must be true/false, findings a count, findings_by_location a mapping"
    if not all(isinstance(k, str) and _NAME.fullmatch(k) and _is_count(n) for k, n in by_kind.items()):
        return "verify_result.findings_by_location: expected counts by kind of location"
    return None


def check_certificate(cert: Any) -> str | None:
    """None if `cert` is a well-formed certificate of a known format; otherwise what is wrong with it."""
    if not isinstance(cert, dict):
        return "expected a JSON object"
    if cert.get("format") != FORMAT:
        return f"unknown format {cert.get('format')!r} (this sisaflow reads {FORMAT})"
    missing, extra = sorted(set(FIELDS) - set(cert)), sorted(set(cert) - set(FIELDS))
    if missing or extra:
        return f"missing field(s) {missing}" if missing else f"unexpected field(s) {extra}"
    req = cert["request"]
    if not isinstance(req, dict) or set(req) != set(REQUEST_FIELDS):
        return f"request: expected exactly {', '.join(REQUEST_FIELDS)}"
    if not isinstance(req["request_id"], str) or not _NAME.fullmatch(req["request_id"]):
        return f"request.request_id {req['request_id']!r}: expected a name of letters, digits and ._:+-"
    if not (_is_count(req["owner_count"]) and _is_count(req["record_count"])):
        return "request: owner_count and record_count must be counts"
    if not _is_time(req["requested_at"]):
        return "request.requested_at: expected an ISO-8601 time"
    if req["reason"] is not None and not isinstance(req["reason"], str):
        return "request.reason: expected text or null"
    if not isinstance(cert["states"], list) or not cert["states"]:
        return "states: expected a non-empty list of {state, at}"
    for i, s in enumerate(cert["states"]):
        if not isinstance(s, dict) or set(s) != {"state", "at"} or s["state"] not in STATES:
            return f"states[{i}]: expected {{state, at}} with state one of {', '.join(STATES)}"
        if not _is_time(s["at"]):
            return f"states[{i}].at: expected an ISO-8601 time"
    hashes = cert["content_hashes"]
    if not isinstance(hashes, list) or not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in hashes):
        return "content_hashes: expected a list of sha256 hex digests"
    if not isinstance(cert["affected"], list):
        return "affected: expected a list of {shard, from_slice, slices}"
    for i, a in enumerate(cert["affected"]):
        ok = isinstance(a, dict) and set(a) == {"shard", "from_slice", "slices"}
        ok = ok and _is_count(a["shard"]) and _is_count(a["from_slice"]) and isinstance(a["slices"], list)
        if not ok or not all(_is_count(k) for k in a["slices"]):
            return f"affected[{i}]: expected {{shard, from_slice, slices}} of non-negative integers"
    for name in ("retired_checkpoints", "new_checkpoints"):
        problem = _check_checkpoints(name, cert[name])
        if problem:
            return problem
    if cert["purge_report"] is not None:
        problem = _check_purge(cert["purge_report"])
        if problem:
            return problem
    if cert["verify_result"] is not None:
        problem = _check_verify(cert["verify_result"])
        if problem:
            return problem
    for name in ("code_version", "ensemble_version"):
        if not isinstance(cert[name], str) or not _NAME.fullmatch(cert[name]):
            return f"{name}: expected a version name"
    if not isinstance(cert["params_hash"], str) or not _SHA256.fullmatch(cert["params_hash"]):
        return "params_hash: expected a sha256 hex digest"
    if not _is_time(cert["issued_at"]):
        return "issued_at: expected an ISO-8601 time"
    sig = cert["signature"]
    if sig is not None and (
        not isinstance(sig, dict)
        or set(sig) != {"alg", "value"}
        or sig["alg"] != ALG
        or not isinstance(sig["value"], str)
        or not _SHA256.fullmatch(sig["value"])
    ):
        return f"signature: expected null or {{alg: {ALG}, value: hex}}"
    return None


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
