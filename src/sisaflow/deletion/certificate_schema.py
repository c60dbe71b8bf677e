"""The certificate's schema: its fields, and `check_certificate`, which says what is wrong with a certificate that
does not follow it (written certificates are checked before writing, read ones before their signature)."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

FORMAT = "sisaflow-deletion-certificate/1"
ALG = "HMAC-SHA256"
STATES = ("pending", "excluded", "retrained", "purged", "certified")
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
OPTIONAL_FIELDS = ("training_environments",)
"""Fields a certificate may carry (format 1 certificates made before them lack them): per retrained shard
(`shard-N`), the environments (library versions, processor kind) that trained its new checkpoints."""
REQUEST_FIELDS = ("request_id", "owner_count", "record_count", "requested_at", "reason")

SHA256 = re.compile(r"[0-9a-f]{64}")
CHECKPOINT = re.compile(r"shard-(\d+)/slice-(\d+)")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
"""Request ids, ensemble versions, code versions and report kinds: short names, safe as a file name."""


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
        if not isinstance(key, str) or not CHECKPOINT.fullmatch(key):
            return f"{name}: {key!r} is not a checkpoint name shard-N/slice-K"
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            return f"{name}[{key}]: not a sha256 hex digest"
    return None


SHARD = re.compile(r"shard-\d+")


def _check_environments(value: Any) -> str | None:
    name = "training_environments"
    if not isinstance(value, dict):
        return f"{name}: expected a mapping of shard-N to a list of environments"
    for shard, envs in value.items():
        if not isinstance(shard, str) or not SHARD.fullmatch(shard):
            return f"{name}: {shard!r} is not a shard name shard-N"
        if not isinstance(envs, list) or not envs:
            return f"{name}[{shard}]: expected a non-empty list of environments"
        for env in envs:
            if (
                not isinstance(env, dict)
                or not env
                or not all(
                    isinstance(k, str) and NAME.fullmatch(k) and isinstance(v, str) and 0 < len(v) <= 200
                    for k, v in env.items()
                )
            ):
                return f"{name}[{shard}]: an environment is a mapping of names to short texts (versions)"
    return None


def _check_purge(value: Any, where: str = "purge_report") -> str | None:
    if not isinstance(value, dict):
        return f"{where}: expected a mapping"
    for key, v in value.items():
        if not isinstance(key, str) or not NAME.fullmatch(key):
            return f"{where}: {key!r} is not a kind name"
        if isinstance(v, dict):
            problem = _check_purge(v, f"{where}.{key}")
            if problem:
                return problem
        elif not isinstance(v, (bool, int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            return f"{where}.{key}: expected a finite number"
    return None


VERIFY_FIELDS = {"clean", "findings", "findings_by_location"}
VERIFY_COVERAGE = {"not_searched", "source_holds"}
"""What the scan left out, and how many of the records the corpus source still holds (certificates of format 1
made before these existed lack them)."""


def _check_verify(value: Any) -> str | None:
    if not isinstance(value, dict) or not VERIFY_FIELDS <= set(value) <= VERIFY_FIELDS | VERIFY_COVERAGE:
        return "verify_result: expected clean, findings and findings_by_location (and not_searched, source_holds)"
    by_kind = value["findings_by_location"]
    if (
        not isinstance(value["clean"], bool)
        or not _is_count(value["findings"])
        or not isinstance(by_kind, dict)
    ):
        return "verify_result: clean must be true/false, findings a count, findings_by_location a mapping"
    if not all(isinstance(k, str) and NAME.fullmatch(k) and _is_count(n) for k, n in by_kind.items()):
        return "verify_result.findings_by_location: expected counts by kind of location"
    unsearched = value.get("not_searched", {})
    if not isinstance(unsearched, dict) or not all(
        isinstance(k, str) and NAME.fullmatch(k) and _is_count(n) for k, n in unsearched.items()
    ):
        return "verify_result.not_searched: expected counts by kind of place"
    holds = value.get("source_holds")
    if holds is not None and not _is_count(holds):
        return "verify_result.source_holds: expected a count or null"
    return None


def check_certificate(cert: Any) -> str | None:
    """None if `cert` is a well-formed certificate of a known format; otherwise what is wrong with it."""
    if not isinstance(cert, dict):
        return "expected a JSON object"
    if cert.get("format") != FORMAT:
        return f"unknown format {cert.get('format')!r} (this sisaflow reads {FORMAT})"
    missing, extra = sorted(set(FIELDS) - set(cert)), sorted(set(cert) - set(FIELDS) - set(OPTIONAL_FIELDS))
    if missing or extra:
        return f"missing field(s) {missing}" if missing else f"unexpected field(s) {extra}"
    req = cert["request"]
    if not isinstance(req, dict) or set(req) != set(REQUEST_FIELDS):
        return f"request: expected exactly {', '.join(REQUEST_FIELDS)}"
    if not isinstance(req["request_id"], str) or not NAME.fullmatch(req["request_id"]):
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
    if not isinstance(hashes, list) or not all(isinstance(h, str) and SHA256.fullmatch(h) for h in hashes):
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
    if "training_environments" in cert:
        problem = _check_environments(cert["training_environments"])
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
        if not isinstance(cert[name], str) or not NAME.fullmatch(cert[name]):
            return f"{name}: expected a version name"
    if not isinstance(cert["params_hash"], str) or not SHA256.fullmatch(cert["params_hash"]):
        return "params_hash: expected a sha256 hex digest"
    if not _is_time(cert["issued_at"]):
        return "issued_at: expected an ISO-8601 time"
    sig = cert["signature"]
    if sig is not None and (
        not isinstance(sig, dict)
        or set(sig) != {"alg", "value"}
        or sig["alg"] != ALG
        or not isinstance(sig["value"], str)
        or not SHA256.fullmatch(sig["value"])
    ):
        return f"signature: expected null or {{alg: {ALG}, value: hex}}"
    return None
