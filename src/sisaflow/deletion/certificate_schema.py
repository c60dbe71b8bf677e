"""The certificate's format: `certificate.schema.json` (a JSON Schema shipped with the package, the published
definition), and `check_certificate`, which validates a certificate against it and then checks what a schema
cannot say. Written certificates are checked before writing, read ones before their signature.

Format 2 adds `retired_files` (the sha256 of every file of every retired checkpoint: weights and optimizer
state) and Ed25519 signatures; certificates of format 1 (HMAC-signed or unsigned) stay valid.
"""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import datetime
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker, ValidationError
from jsonschema.exceptions import best_match

FORMAT_1 = "sisaflow-deletion-certificate/1"
FORMAT = "sisaflow-deletion-certificate/2"
"""The format sisaflow writes."""
FORMATS = (FORMAT_1, FORMAT)
"""The formats sisaflow reads."""
HMAC_ALG = "HMAC-SHA256"
ED25519_ALG = "ed25519"
SCHEMA_FILE = "certificate.schema.json"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors")
"""The files of a checkpoint a certificate lists under retired_files (training.checkpoint's MODEL_FILE and
OPTIMIZER_FILE; the schema names them too)."""

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
"""Request ids, ensemble versions, code versions and report kinds: short names, safe as a file name (the schema's
`name`)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@functools.cache
def schema() -> dict:
    """The certificate's JSON Schema (draft 2020-12), as shipped in the package."""
    return json.loads(resources.files("sisaflow.deletion").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


_formats = FormatChecker(formats=())


@_formats.checks("date-time", raises=ValueError)
def _is_time(value: object) -> bool:
    # ISO 8601 as Python reads it: every time sisaflow ever wrote (RFC 3339 with an offset) and nothing vaguer
    return not isinstance(value, str) or bool(datetime.fromisoformat(value))


@functools.cache
def _validator() -> Draft202012Validator:
    Draft202012Validator.check_schema(schema())
    return Draft202012Validator(schema(), format_checker=_formats)


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(error: ValidationError, fmt: str) -> str:
    """One line naming the field and what it should be."""
    where = _where(error.absolute_path)
    prefix = f"{where}: " if where else ""
    if error.validator == "required":
        return f"{prefix}missing field(s) {sorted(set(error.validator_value) - set(error.instance))}"
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        return f"{prefix}unexpected field(s) {sorted(k for k in error.instance if k not in known)}"
    if error.validator == "format":
        return f"{prefix}expected an ISO-8601 time, got {_short(error.instance)}"
    if error.validator == "not":
        return f"{prefix}not part of format {fmt}"
    if (
        error.validator in ("oneOf", "anyOf")
        and isinstance(error.schema, dict)
        and error.schema.get("description")
    ):
        return f"{prefix}expected {error.schema['description']}, got {_short(error.instance)}"
    message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
    return prefix + message


def _strings(obj: Any, where: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, str):
        return [(where, obj)]
    if isinstance(obj, dict):
        return [
            x for k, v in obj.items() for x in ((where, str(k)), *_strings(v, f"{where}.{k}".lstrip(".")))
        ]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _strings(v, f"{where}[{i}]")]
    return []


def _non_finite(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}".lstrip("."))
        if found is not None:
            return found
    return None


def _beyond_the_schema(cert: dict) -> str | None:
    """What the schema cannot say: finite numbers, no control character in a name (Python's `$` also matches
    before a final newline), and format 2's retired_files agreeing with retired_checkpoints."""
    where = _non_finite(cert)
    if where is not None:
        return f"{where}: expected a finite number"
    for where, text in _strings(cert):
        if where != "request.reason" and _CONTROL.search(text):
            return f"{where or 'a field name'}: a control character (newline, tab ...) in {_short(text)}"
    if cert["format"] != FORMAT_1:
        weights = {name: files["model.safetensors"] for name, files in cert["retired_files"].items()}
        if weights != cert["retired_checkpoints"]:
            return (
                "retired_files: its model.safetensors hashes must be exactly retired_checkpoints' "
                "(the same checkpoints, the same weights)"
            )
    return None


def check_certificate(cert: Any) -> str | None:
    """None if `cert` is a well-formed certificate of a format sisaflow reads; otherwise, in one line, what is
    wrong with it (the field first). It does not look for owner or record ids: `build_certificate` does."""
    if not isinstance(cert, dict):
        return "expected a JSON object"
    if cert.get("format") not in FORMATS:
        return f"unknown format {_short(cert.get('format'))} (this sisaflow reads {', '.join(FORMATS)})"
    error = best_match(_validator().iter_errors(cert))
    if error is not None:
        return _describe(error, cert["format"])
    return _beyond_the_schema(cert)
