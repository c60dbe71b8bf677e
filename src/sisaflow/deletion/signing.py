"""Signing keys for deletion certificates: Ed25519 key pairs (written, loaded and checked here), and the HMAC key
of older certificates.

An Ed25519 signature lets anyone holding the public key check a certificate without being able to forge one.
`write_key_pair` writes the private key (PKCS#8 PEM, mode 0600) and the public key (SubjectPublicKeyInfo PEM)
beside it; by default in the workspace's .sisaflow/keys/, which git ignores and no DVC output covers. A key's
fingerprint is the sha256 of its raw 32 public bytes, hex. `signing_key` picks the key a certificate is signed
with: SISAFLOW_SIGNING_KEY (a private key file) or the workspace's key, else, only when neither exists, the HMAC
secret of SISAFLOW_CERTIFICATE_KEY (whose holder can both sign and check), else none.

Every problem with a key file (missing, unreadable, not a key, of another type, a public key where a private one
is needed, readable by group or others) is a SigningKeyError naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sisaflow.core.errors import SisaflowError
from sisaflow.core.paths import Workspace

SIGNING_KEY_ENV = "SISAFLOW_SIGNING_KEY"
"""Path of the Ed25519 private key (PEM) certificates are signed with."""
SIGNING_KEY_PEM_ENV = "SISAFLOW_SIGNING_KEY_PEM"
"""The Ed25519 private key's PEM text itself, as a secret store hands it over; used when no key file is named.
(The Prefect deployments do not set it: they hand a Secret block's key over in memory, `run_signing_key`.)"""
HMAC_KEY_ENV = "SISAFLOW_CERTIFICATE_KEY"
"""The HMAC secret of older certificates (UTF-8 bytes as they are): signs only where no Ed25519 key exists."""

Key = Ed25519PrivateKey | bytes
"""What signs a certificate: an Ed25519 private key, or an HMAC secret."""


class SigningKeyError(SisaflowError):
    """A key file is missing, unreadable, not an Ed25519 key of the kind needed, or too open."""


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """sha256 (hex) of the raw 32-byte public key: what a certificate names its key by."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_path(private_path: Path) -> Path:
    """Where the public key of `private_path` is written: signing-key.pem -> signing-key.pub.pem."""
    return private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file of mode 0600 (created so from the start), then move it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_key_pair(private_path: Path, force: bool = False) -> tuple[Path, Path, str]:
    """A new Ed25519 key pair: the private key at `private_path` (mode 0600, its directory created 0700), the
    public key beside it; returns (private path, public path, fingerprint). Refuses to replace an existing key
    unless `force`: the certificates it signed are checked with its public key."""
    private_path = Path(private_path).expanduser().absolute()
    public_path = public_key_path(private_path)
    if private_path.exists() and not force:
        raise SigningKeyError(
            f"{private_path}: a key is already there; certificates it signed are checked with "
            f"{public_path} (keep both), or pass --force to replace it"
        )
    private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, fingerprint(key)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise SigningKeyError(f"{path}: a directory, not a {what} file") from None
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def _kind(key: object) -> str:
    """'an RSA key', 'an EC key' ... for a message."""
    name = type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")
    return f"an {name} key" if name[:1].upper() in "AEIOUR" else f"a {name} key"


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key of a PEM file that only its owner can read (mode 0600 or stricter)."""
    path = Path(path).expanduser()
    data = _read(path, "private key")
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise SigningKeyError(
            f"{path}: a public key; signing needs the private key (`sisaflow keys init` writes both)"
        )
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(
            f"{path}: a private key that group or others may read or change (mode {stat.filemode(mode)}); "
            f"run `chmod 600 {path}`, and make a new key pair if anyone else could have read it"
        )
    return _private_key(data, str(path))


def private_key_from_pem(text: str, where: str) -> Ed25519PrivateKey:
    """The Ed25519 private key of PEM text held in memory (`where` names its source in messages)."""
    return _private_key(text.encode("utf-8"), where)


def _private_key(data: bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(
            f"{where}: an encrypted private key; sisaflow needs an unencrypted one"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"{where}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{where}: {_kind(key)}, not an Ed25519 key (`sisaflow keys init` makes one)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM file (a private key is refused: hand auditors the public one)."""
    path = Path(path).expanduser()
    data = _read(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise SigningKeyError(
            f"{path}: a private key; checking a certificate takes the public key ({public_key_path(path).name} "
            "beside it), and the private key should stay with whoever signs"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path}: {_kind(key)}, not an Ed25519 key")
    return key


def sign_ed25519(data: bytes, key: Ed25519PrivateKey) -> str:
    """The Ed25519 signature of `data`, hex (128 digits)."""
    return key.sign(data).hex()


def verify_ed25519(data: bytes, signature_hex: str, key: Ed25519PublicKey) -> bool:
    """True when `signature_hex` is `key`'s signature of `data`."""
    try:
        key.verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def hmac_hex(data: bytes, key: bytes) -> str:
    """HMAC-SHA256 of `data` under `key`, hex."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def hmac_key_from_env() -> bytes | None:
    """The HMAC secret: the UTF-8 bytes of $SISAFLOW_CERTIFICATE_KEY as they are; None when unset or empty."""
    value = os.environ.get(HMAC_KEY_ENV, "")
    return value.encode("utf-8") if value else None


_run_key: Ed25519PrivateKey | None = None
"""The key `run_signing_key` holds for this process: in memory only."""


@contextlib.contextmanager
def run_signing_key(pem: str, where: str) -> Iterator[Ed25519PrivateKey]:
    """The Ed25519 private key in `pem` (from a secret store; `where` names it in errors) signs this process's
    certificates for the body of the `with`. It is held in this process's memory only, never in os.environ, so
    no subprocess (git, dvc, a Ray worker) inherits it, and it is never written to disk."""
    global _run_key
    key = private_key_from_pem(pem, where)
    before, _run_key = _run_key, key
    try:
        yield key
    finally:
        _run_key = before


def signing_key(ws: Workspace | None, explicit: Path | None = None) -> Key | None:
    """The key a certificate is signed with: `explicit` (a private key file), else $SISAFLOW_SIGNING_KEY, else the
    key `run_signing_key` holds, else the PEM text of $SISAFLOW_SIGNING_KEY_PEM, else the workspace's own key when
    `sisaflow keys init` wrote one, else the HMAC secret of $SISAFLOW_CERTIFICATE_KEY, else None (unsigned). A
    named or default key file that cannot be used is an error, never a silent fallback."""
    named = explicit or os.environ.get(SIGNING_KEY_ENV) or None
    if named:
        return load_private_key(Path(named))
    if _run_key is not None:
        return _run_key
    pem = os.environ.get(SIGNING_KEY_PEM_ENV)
    if pem:
        return private_key_from_pem(pem, f"${SIGNING_KEY_PEM_ENV}")
    if ws is not None and ws.signing_key_file.exists():
        return load_private_key(ws.signing_key_file)
    return hmac_key_from_env()


def default_public_key(ws: Workspace | None) -> Path | None:
    """The public key beside the key `signing_key` would pick, when there is one (what `certificate --verify`
    checks with when no --public-key is given)."""
    named = os.environ.get(SIGNING_KEY_ENV)
    if named:
        path = public_key_path(Path(named).expanduser())
        return path if path.exists() else None
    if ws is not None and ws.public_key_file.exists():
        return ws.public_key_file
    return None
