"""The hashes a workspace publishes for its records, keyed so that a certificate or the ledger does not let anyone
confirm a guess.

A record's content hash (over its id and text) and its text hash are what lineage, the ledger and certificates
carry instead of text. Plain sha256 of a short or guessable record (a name and a diagnosis, a phone number) is as
good as the text to whoever holds it: hash the guess and compare. So a workspace hashes under a secret key:
HMAC-SHA256 with 32 random bytes kept in .sisaflow/keys/hash-key (mode 0600), which git ignores and no DVC output
covers. params.yaml names the key by its id (`corpus.hash_key`, "hk-" and 16 hex digits of a hash of the key, which
reveals nothing of it), so a clone without the key refuses to import instead of hashing differently and letting
deleted texts back in. A workspace with no `corpus.hash_key` (created before keys, or with `init --plain-hashes`)
keeps plain sha256.

An auditor who is shown a record by the operator can check it against a certificate with the key (`sisaflow
certificate --open`, run by the operator); without the key a certificate's hashes say nothing about any text.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from sisaflow.core.config import CorpusParams
from sisaflow.core.errors import WorkspaceError
from sisaflow.core.fsio import digest
from sisaflow.core.paths import Workspace

KEY_BYTES = 32


class HashKeyError(WorkspaceError):
    """The workspace's hash key is missing, unreadable, malformed, too open, or another key than params names."""


@dataclass(frozen=True)
class Hasher:
    """Hashes an ordered list of strings: plain sha256 without a key, HMAC-SHA256 under it (each part
    length-prefixed either way, so the parts' boundaries are unambiguous)."""

    key: bytes | None = None

    def __call__(self, parts: tuple[str, ...] | list[str]) -> str:
        if self.key is None:
            return digest(parts)
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            b = part.encode("utf-8")
            mac.update(len(b).to_bytes(8, "big"))
            mac.update(b)
        return mac.hexdigest()

    @property
    def key_id(self) -> str | None:
        return key_id(self.key) if self.key is not None else None


PLAIN = Hasher()
"""Plain sha256: workspaces without a hash key, and records that are no workspace's (a file to score)."""


def key_id(key: bytes) -> str:
    """'hk-' and 16 hex digits of a domain-separated sha256 of the key: names it without revealing it."""
    return "hk-" + hashlib.sha256(b"sisaflow-hash-key-id\0" + key).hexdigest()[:16]


def write_new_key(path: Path) -> str:
    """Write 32 random bytes (hex) to `path`, mode 0600 in a 0700 folder; return the key's id."""
    return write_key(path, secrets.token_bytes(KEY_BYTES))


def write_key(path: Path, key: bytes) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key_id(key)


def read_key(path: Path) -> bytes:
    """The key in `path` (64 hex digits), readable by its owner only; HashKeyError naming the file otherwise."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="ascii").strip()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise HashKeyError(f"{path}: no such hash key file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HashKeyError(f"{path}: cannot read the hash key ({exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise HashKeyError(
            f"{path}: a hash key that group or others may read (mode {stat.filemode(mode)}); chmod 600"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise HashKeyError(f"{path}: not a hash key ({KEY_BYTES * 2} hex digits expected)")
    return key


def hasher_for(key_file: Path, expected_id: str | None) -> Hasher:
    """The hasher of a workspace whose params name the key `expected_id` (None: plain sha256)."""
    if expected_id is None:
        return PLAIN
    if not Path(key_file).exists():
        raise HashKeyError(
            f"{key_file}: missing. This workspace hashes its records under the key {expected_id} (params.yaml "
            "corpus.hash_key), which by design is in neither git nor DVC: copy it from the workspace it was "
            "created in (mode 600). Without it, hashes would differ and deleted records could come back"
        )
    key = read_key(key_file)
    if key_id(key) != expected_id:
        raise HashKeyError(
            f"{key_file}: the key {key_id(key)}, but params.yaml corpus.hash_key names {expected_id}; restore that key"
        )
    return Hasher(key)


def workspace_hasher(ws: Workspace, corpus: CorpusParams) -> Hasher:
    """The hasher of the workspace `ws` with corpus params `corpus` (HashKeyError when its key is not there)."""
    return hasher_for(ws.hash_key_file, corpus.hash_key)
