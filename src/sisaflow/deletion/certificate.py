"""Deletion certificates: what a privacy engineer hands an auditor to show a request was carried out.

A certificate is one JSON object (format `sisaflow-deletion-certificate/2`, defined by certificate.schema.json)
recording the request (counts only), the timeline of its states, the content hashes removed, the shards and
slices retrained, the retired and new checkpoint weight hashes, the sha256 of every retired file (weights and
optimizer state), what was purged, what the post-deletion scan found, and the code, params and ensemble that did
it. It never holds an owner id, a record id or record text: `build_certificate` keeps only counts, hashes and
numbers, a reason only as its code (sisaflow.deletion.reasons), and refuses to return a certificate that still
holds an id.

The signature covers the canonical JSON (sorted keys, no whitespace, UTF-8) of the certificate without its
`signature` field. Ed25519 (sisaflow.deletion.signing): {"alg": "ed25519", "public_key_sha256", "value"}, which
anyone with the public key can check and nobody without the private key can forge. HMAC-SHA256 under the UTF-8
bytes of SISAFLOW_CERTIFICATE_KEY, as older certificates carry it, is used to sign only where no Ed25519 key
exists; whoever holds that key can both sign and check. Certificates of format 1 stay valid.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import math
import re
import subprocess
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sisaflow.core import faults, ledger
from sisaflow.core.config import Params
from sisaflow.core.errors import DeletionError, SisaflowError
from sisaflow.core.fsio import read_json, write_text
from sisaflow.core.paths import Workspace
from sisaflow.deletion.certificate_html import render_html
from sisaflow.deletion.certificate_schema import ED25519_ALG, FORMAT, HMAC_ALG, NAME, check_certificate
from sisaflow.deletion.impact import impact_file, retired_file_hashes
from sisaflow.deletion.leftovers import ScanSummary
from sisaflow.deletion.purge import PurgeReport
from sisaflow.deletion.reasons import REASONS
from sisaflow.deletion.signing import (
    HMAC_KEY_ENV,
    Key,
    fingerprint,
    hmac_hex,
    hmac_key_from_env,
    sign_ed25519,
    signing_key,
    verify_ed25519,
)

KEY_ENV = HMAC_KEY_ENV


class CertificateError(SisaflowError):
    """A certificate cannot be built, written or read as asked (bad input, an id that would leak)."""


# ---- canonical form and signing ----


def canonical_json(obj: Any) -> bytes:
    """The bytes that are hashed and signed: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def signed_bytes(cert: dict) -> bytes:
    """What a signature covers: the canonical JSON of `cert` without its `signature` field."""
    return canonical_json({k: v for k, v in cert.items() if k != "signature"})


def sign(cert: dict, key: Key) -> dict:
    """A copy of `cert` signed over everything else: {"alg": "ed25519", "public_key_sha256", "value"} with an
    Ed25519 private key, {"alg": "HMAC-SHA256", "value"} with an HMAC secret (bytes)."""
    if isinstance(key, Ed25519PrivateKey):
        sig = {
            "alg": ED25519_ALG,
            "public_key_sha256": fingerprint(key),
            "value": sign_ed25519(signed_bytes(cert), key),
        }
    elif isinstance(key, bytes) and key:
        sig = {"alg": HMAC_ALG, "value": hmac_hex(signed_bytes(cert), key)}
    else:
        raise CertificateError("an empty key cannot sign a certificate")
    return {**cert, "signature": sig}


def verify_signature(cert: dict, key: bytes | Ed25519PublicKey | None) -> bool:
    """True when `cert` carries a signature `key` checks: Ed25519 by this public key (and naming it), or an
    HMAC-SHA256 that this secret reproduces (constant-time compare)."""
    sig = cert.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        return False
    if isinstance(key, Ed25519PublicKey):
        return (
            sig.get("alg") == ED25519_ALG
            and sig.get("public_key_sha256") == fingerprint(key)
            and verify_ed25519(signed_bytes(cert), sig["value"], key)
        )
    if isinstance(key, bytes) and key and sig.get("alg") == HMAC_ALG:
        return hmac.compare_digest(sig["value"], hmac_hex(signed_bytes(cert), key))
    return False


def key_from_env() -> bytes | None:
    """The HMAC secret: the UTF-8 bytes of $SISAFLOW_CERTIFICATE_KEY as they are; None when unset or empty."""
    return hmac_key_from_env()


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

    where = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[1]
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
    from sisaflow.core.config import Params

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


def _reason_code(reason: object) -> str | None:
    """The request's reason code; free text (a request recorded before codes) is never copied: "other"."""
    if reason in (None, ""):
        return None
    return reason if isinstance(reason, str) and reason in REASONS else "other"


def _clean_request(request: dict) -> dict:
    reason = request.get("reason")
    owners = request.get("owner_count", request.get("owners"))
    records = request.get("record_count", request.get("records"))
    return {
        "request_id": request.get("request_id"),
        "owner_count": _count(owners, "owners"),
        "record_count": _count(records, "records"),
        "requested_at": request.get("requested_at"),
        "reason": _reason_code(reason),
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
    retired_files: dict[str, dict[str, str]] | None = None,
    hash_key_id: str | None = None,
) -> dict:
    """An unsigned certificate (signature null) after checking every field; pass it to `sign` to sign it.

    `request` may be a ledger entry with owner and record ids: they become counts, any other key is dropped, and
    the reason is kept as its code only (free text of an older request becomes "other"). `retired_files` ({"shard-N/slice-K": {file name:
    sha256}}, the weights and optimizer state of every retired checkpoint) defaults to the weights of
    `retired_checkpoints` alone. A CertificateError names the first bad field, and is raised too if any named id
    would still appear in the certificate (e.g. as the request id)."""
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
        "retired_files": copy.deepcopy(retired_files)
        if retired_files is not None
        else {name: {"model.safetensors": h} for name, h in dict(retired_checkpoints).items()},
        "purge_report": None if purge_report is None else _clean_purge(dict(purge_report)),
        "verify_result": None if verify_result is None else _clean_verify(dict(verify_result)),
        "code_version": code_version,
        "params_hash": params_hash,
        "ensemble_version": ensemble_version,
        "issued_at": issued_at,
        "signature": None,
    }
    # how content_hashes were made: keyed, a guessed record cannot be matched to them without the workspace's key
    cert["record_hashes"] = (
        {"alg": "hmac-sha256", "key_id": hash_key_id} if hash_key_id else {"alg": "sha256"}
    )
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
    cert["retired_files"] = {k: dict(sorted(v.items())) for k, v in sorted(cert["retired_files"].items())}
    leaked = _ids(request) & set(_strings(cert))
    if leaked:
        raise CertificateError(
            f"request {cert['request']['request_id']}: {len(leaked)} owner/record id(s) would appear in the "
            "certificate (for example as its request id); certificates carry counts and hashes only"
        )
    return cert


def verify_file(
    path: Path, key: bytes | None = None, public_key: Ed25519PublicKey | None = None
) -> tuple[bool, str]:
    """(valid, message naming the file) for a certificate file: of a format sisaflow reads, valid under its JSON
    Schema, and signed: with Ed25519 by `public_key`, or with HMAC-SHA256 under `key` (older certificates).

    Only a signature the given key checks makes a certificate valid: an unsigned one, one signed by another key,
    or a signed one checked without the key it needs, is reported as such and is not valid."""
    try:
        cert = read_json(Path(path))
    except (OSError, UnicodeDecodeError) as exc:
        return False, f"{path}: cannot read the certificate ({getattr(exc, 'strerror', None) or exc})"
    except json.JSONDecodeError as exc:
        return False, f"{path}: malformed certificate: not JSON ({exc})"
    problem = check_certificate(cert)
    if problem:
        return False, f"{path}: malformed certificate: {problem}"
    sig, rid = cert["signature"], cert["request"]["request_id"]
    if sig is None:
        return (
            False,
            f"{path}: unsigned: the certificate carries no signature, so nothing shows it is unchanged",
        )
    if sig["alg"] == ED25519_ALG:
        signer = sig["public_key_sha256"]
        if public_key is None:
            return False, (
                f"{path}: signed (ed25519, key {signer}), but no public key to check it with: "
                "pass --public-key PUB"
            )
        if signer != fingerprint(public_key):
            return False, (
                f"{path}: signed by another key (public key sha256 {signer}), not by the one given "
                f"({fingerprint(public_key)})"
            )
    elif not key:
        extra = " (a public key cannot check an HMAC signature)" if public_key is not None else ""
        return False, f"{path}: signed ({HMAC_ALG}), but no key to check it with: set {KEY_ENV}{extra}"
    if not verify_signature(cert, public_key if sig["alg"] == ED25519_ALG else key):
        return False, f"{path}: signature does not match: the certificate was changed or the key differs"
    by = f" by key {sig['public_key_sha256']}" if sig["alg"] == ED25519_ALG else ""
    return True, f"{path}: valid: {sig['alg']} signature{by} matches; request {rid}"


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


# ---- issuing a request's certificate ----


@dataclass
class AppliedRun:
    """What the run that applied a request records of it, as its certificate reads it from the run report
    (runs/<run id>-<kind>.json; the pipeline's `RunReport` is one of these and more)."""

    retrained_requests: list[str] = field(default_factory=list)
    trained: dict[int, dict] = field(default_factory=dict)
    """{shard: {"from_slice", "tokens", "seconds", "environments"}} of every shard the run trained."""
    slices: int = 0
    checkpoints_before: dict = field(default_factory=dict)
    checkpoints_after: dict = field(default_factory=dict)
    purge: PurgeReport | None = None
    verify: ScanSummary | None = None
    ensemble_version: str = ""

    def to_json(self) -> dict:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("purge", "verify")}
        out = asdict(type(self)(**plain))  # deep copies of the plain fields
        out["purge"] = self.purge.to_json() if self.purge else None
        out["verify"] = self.verify.to_json() if self.verify else None
        return out

    @classmethod
    def from_json(cls, raw: dict) -> Self:
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in raw.items() if k in known and k not in ("purge", "verify", "trained")})
        out.trained = {int(k): v for k, v in raw.get("trained", {}).items()}
        out.purge = PurgeReport.from_json(raw["purge"]) if raw.get("purge") else None
        out.verify = ScanSummary.from_json(raw["verify"]) if raw.get("verify") else None
        return out


def _run_that_applied(ws: Workspace, request_id: str) -> AppliedRun:
    for path in sorted(ws.runs_dir.glob("*.json"), reverse=True):
        try:
            rep = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if request_id in rep.get("retrained_requests", []):
            return AppliedRun.from_json(rep)
    raise DeletionError(f"request {request_id}: no run report says which run applied it (runs/ was cleared?)")


def certify(ws: Workspace, request_id: str, key_file: Path | None = None) -> tuple[Path, Path]:
    """Write the certificate of an applied request and mark it certified. Refuses a request not yet purged
    or whose post-deletion scan found a copy. Signed with `signing.signing_key(ws, key_file)`: `key_file`,
    $SISAFLOW_SIGNING_KEY, the workspace's key, or the HMAC secret where no Ed25519 key exists (else unsigned);
    a key file that cannot be used stops it (a SigningKeyError naming the file) before anything is written."""
    requests = {r.request_id: r for r in ledger.read_ledger(ws.ledger_file)}
    if request_id not in requests:
        raise DeletionError(f"unknown request id {request_id!r}; `sisaflow requests` lists them")
    req = requests[request_id]
    key = signing_key(ws, key_file)
    state = ledger.current_state(ws.ledger_file).get(request_id, "pending")
    if ledger.STATES.index(state) < ledger.STATES.index("purged"):
        raise DeletionError(f"request {request_id} is {state}: it is certified once retrained and purged")
    run = _run_that_applied(ws, request_id)
    if run.purge and run.purge.remote_not_collected:
        raise DeletionError(
            f"request {request_id}: the DVC remote could not be garbage-collected when it was purged, so it may "
            "still hold old copies; `sisaflow run` purges again (and certifies) once the remote is reachable"
        )
    verify = run.verify
    if verify is not None and verify.findings:
        # the copies the run's scan found may have been removed since: scan again, and certify only if clean
        from sisaflow.deletion.leftovers import summary

        verify = summary(ws, Params.load(ws.params_file), [request_id])
        if verify.findings:
            raise DeletionError(
                f"request {request_id}: {verify.findings} copy(ies) of its records are still on disk; "
                f"`sisaflow verify --request {request_id}` shows where; remove them, then run "
                f"`sisaflow certificate {request_id}` again"
            )
    affected, retired, new, files = _request_impact(ws, request_id, run) or _trained_by(run)
    environments = {
        f"shard-{a['shard']}": run.trained[a["shard"]]["environments"]
        for a in affected
        if run.trained.get(a["shard"], {}).get("environments")
    }

    issued_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    states = ledger.states(ws.ledger_file).get(request_id, [])
    if not any(s["state"] == "certified" for s in states):
        states = [*states, {"state": "certified", "at": issued_at}]
    cert = build_certificate(
        request=asdict(req),
        states=states,
        content_hashes=req.content_hashes,
        affected=affected,
        retired_checkpoints=retired,
        new_checkpoints=new,
        purge_report=run.purge.to_json() if run.purge else None,
        verify_result=verify.to_json() if verify else None,
        code_version=code_version(),
        params_hash=params_hash(ws.params_file),
        ensemble_version=run.ensemble_version,
        issued_at=issued_at,
        training_environments=environments,
        retired_files=files,
        hash_key_id=req.hash_key,
    )
    if key:
        cert = sign(cert, key)
    paths = write_certificate(ws.certificates_dir, cert)
    faults.kill_point("certify")  # test-only: a crash between the files and the state
    ledger.mark(ws.ledger_file, [request_id], "certified")
    return paths


def _request_impact(
    ws: Workspace, request_id: str, run: AppliedRun
) -> tuple[list[dict], dict, dict, dict | None] | None:
    """(affected, retired, new, retired files) of one request from its impact record and the run that finished
    it."""
    path = impact_file(ws, request_id)
    if not path.is_file():
        return None
    impact = read_json(path)
    after = run.checkpoints_after
    affected, retired, new = [], {}, {}
    for shard, s in impact["shards"].items():
        first = s["from_slice"]
        affected.append(
            {"shard": int(shard), "from_slice": first, "slices": list(range(first, impact["slices"]))}
        )
        retired.update({f"shard-{shard}/slice-{k}": h for k, h in s["retired"].items()})
        new.update(
            {f"shard-{shard}/slice-{k}": h for k, h in after.get(shard, {}).items() if int(k) >= first}
        )
    return affected, retired, new, retired_file_hashes(impact)


def _trained_by(run: AppliedRun) -> tuple[list[dict], dict, dict, None]:
    """(affected, retired, new, None) as everything the run retrained: for a request without an impact record
    (one applied before impact records existed, or under a new shard layout). The run report holds weights
    hashes only, so the certificate's retired_files names the weights alone."""
    trained, slices = run.trained, run.slices
    affected = [
        {"shard": s, "from_slice": t["from_slice"], "slices": list(range(t["from_slice"], slices))}
        for s, t in sorted(trained.items())
    ]

    def pick(hashes: dict) -> dict[str, str]:
        out = {}
        for shard, by_slice in hashes.items():
            if int(shard) in trained:
                for k, h in by_slice.items():
                    if int(k) >= trained[int(shard)]["from_slice"]:
                        out[f"shard-{shard}/slice-{k}"] = h
        return out

    return affected, pick(run.checkpoints_before), pick(run.checkpoints_after), None
