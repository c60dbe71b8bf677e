"""Reading deletion-request files (`sisaflow forget --file`)."""

from __future__ import annotations

import json
from pathlib import Path

from sisaflow.errors import DeletionError


def read_request_file(path: Path) -> tuple[list[str], list[str]]:
    """Owners and records named in a request file.

    Each non-empty line is either a JSON object with "owner" or "record" (a string or a list of strings), or a
    bare id, which is taken as an owner id. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DeletionError(f"{path}: request file not found")
    owners: list[str] = []
    records: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            owners.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeletionError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
        unknown = set(obj) - {"owner", "record"}
        if unknown or not obj:
            raise DeletionError(
                f'{path}:{n}: expected the key "owner" or "record", got {sorted(obj) or "none"}'
            )
        for key, target in (("owner", owners), ("record", records)):
            value = obj.get(key)
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if not values or not all(
                isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip() for v in values
            ):
                raise DeletionError(f'{path}:{n}: "{key}" must be a non-empty id or list of ids')
            target.extend(str(v) for v in values)
    if not owners and not records:
        raise DeletionError(f"{path}: names no owner or record")
    return owners, records
