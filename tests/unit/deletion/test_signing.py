"""Ed25519 certificates: signed with a private key only its owner can read, checked with the public key alone (by
sisaflow, and by the README's few lines of Python without it); every bad key file or certificate is one line naming
the file and a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sisaflow import cli
from sisaflow.core.paths import Workspace
from sisaflow.deletion.certificate import (
    build_certificate,
    sign,
    verify_file,
    verify_signature,
    write_certificate,
)
from sisaflow.deletion.signing import (
    HMAC_KEY_ENV,
    SIGNING_KEY_ENV,
    SigningKeyError,
    fingerprint,
    load_private_key,
    load_public_key,
    signing_key,
    write_key_pair,
)
from tests.unit.deletion.test_certificate import KEY, inputs

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _no_keys_from_the_environment(monkeypatch):
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    private, public, _ = write_key_pair(tmp_path / "keys" / "signing-key.pem")
    return private, public


def _signed(tmp_path: Path, private: Path, request_id: str = "req-1") -> Path:
    req = {**inputs()["request"], "request_id": request_id}
    cert = build_certificate(
        **inputs(
            request=req,
            retired_files={
                "shard-3/slice-2": {"model.safetensors": _h(10), "optimizer.safetensors": _h(12)},
                "shard-3/slice-3": {"model.safetensors": _h(11), "optimizer.safetensors": _h(13)},
            },
        )
    )
    json_path, _ = write_certificate(tmp_path / "certificates", sign(cert, load_private_key(private)))
    return json_path


def _h(n: int) -> str:
    import hashlib

    return hashlib.sha256(str(n).encode()).hexdigest()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- key files ----


def test_keys_init_writes_a_private_key_only_its_owner_can_read(tmp_path, capsys):
    out = tmp_path / "elsewhere" / "signing.pem"
    rc, printed, _ = _cli(capsys, "keys", "init", "--out", str(out))
    assert rc == 0
    public = tmp_path / "elsewhere" / "signing.pub.pem"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.parent.stat().st_mode) & 0o077 == 0
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key = load_private_key(out)
    assert fingerprint(load_public_key(public)) == fingerprint(key)
    assert fingerprint(key) in printed and str(public) in printed
    # a second init does not replace the key that signed earlier certificates
    rc, _, err = _cli(capsys, "keys", "init", "--out", str(out))
    assert rc == 1 and str(out) in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert fingerprint(load_private_key(out)) == fingerprint(key)
    assert _cli(capsys, "keys", "init", "--out", str(out), "--force")[0] == 0
    assert fingerprint(load_private_key(out)) != fingerprint(key)


def test_the_default_key_lives_where_git_ignores_it(tmp_path, capsys):
    """`keys init` in a workspace: .sisaflow/keys/, which the .gitignore that `sisaflow init` writes covers."""
    from sisaflow.pipeline.create import GITIGNORE

    root = tmp_path / "ws"
    root.mkdir()
    (root / "params.yaml").write_text("{}\n")
    (root / ".gitignore").write_text(GITIGNORE)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert _cli(capsys, "--workspace", str(root), "keys", "init")[0] == 0
    ws = Workspace(root)
    assert ws.signing_key_file.is_file() and ws.public_key_file.is_file()
    assert stat.S_IMODE(ws.signing_key_file.stat().st_mode) == 0o600
    for path in (ws.signing_key_file, ws.public_key_file):
        assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=root).returncode == 0, path
    assert not (root / "dvc.yaml").exists() or ".sisaflow" not in (root / "dvc.yaml").read_text()
    # and where git would track it, `keys init` refuses
    rc, _, err = _cli(capsys, "keys", "init", "--out", str(root / "keys" / "k.pem"))
    assert rc == 1 and "never be committed" in err and not (root / "keys" / "k.pem").exists()


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


BAD_PRIVATE = {
    "missing": (lambda d: d / "nope.pem", "no such private key file"),
    "a directory": (lambda d: d, "a directory"),
    "rsa": (
        lambda d: _write(d / "rsa.pem", _pem_private(rsa.generate_private_key(65537, 2048))),
        "an RSA key, not an Ed25519 key",
    ),
    "ec": (
        lambda d: _write(d / "ec.pem", _pem_private(ec.generate_private_key(ec.SECP256R1()))),
        "not an Ed25519 key",
    ),
    "public": (
        lambda d: _write(d / "pub.pem", _pem_public(Ed25519PrivateKey.generate())),
        "a public key; signing needs the private key",
    ),
    "group-readable": (
        lambda d: _write(d / "open.pem", _pem_private(Ed25519PrivateKey.generate()), 0o640),
        "group or others may read",
    ),
    "world-readable": (
        lambda d: _write(d / "open.pem", _pem_private(Ed25519PrivateKey.generate()), 0o644),
        "chmod 600",
    ),
    "encrypted": (
        lambda d: _write(
            d / "enc.pem",
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
        ),
        "encrypted",
    ),
    "not a key": (lambda d: _write(d / "junk.pem", b"hello\n"), "not a PEM private key"),
}


@pytest.mark.parametrize("case", sorted(BAD_PRIVATE))
def test_a_bad_signing_key_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, case):
    make, expected = BAD_PRIVATE[case]
    path = make(tmp_path)
    with pytest.raises(SigningKeyError, match=re.escape(expected)) as info:
        load_private_key(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    # signing_key never falls back to another key (the HMAC secret here) when the named one is bad
    monkeypatch.setenv(HMAC_KEY_ENV, "some-secret")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(path))
    with pytest.raises(SigningKeyError):
        signing_key(None)


def test_an_unreadable_key_file_is_named(tmp_path):
    """As root (CI runs as root) mode 000 stops no read, so there the check runs in a child process without the
    capabilities that let root read anything (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; util-linux's setpriv),
    for which it does: the case is tested everywhere instead of skipped."""
    path = _write(tmp_path / "k.pem", _pem_private(Ed25519PrivateKey.generate()), 0o000)
    if os.geteuid() != 0:
        with pytest.raises(SigningKeyError, match=f"{re.escape(str(path))}: cannot read"):
            load_private_key(path)
        return
    code = (
        "import sys; from pathlib import Path; from sisaflow.deletion.signing import load_private_key\n"
        "try:\n    load_private_key(Path(sys.argv[1]))\nexcept Exception as exc:\n    print(exc)"
    )
    drop = "-dac_override,-dac_read_search"
    child = subprocess.run(
        ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.startswith(f"{path}: cannot read the private key (Permission denied)"), child.stdout


BAD_PUBLIC = {
    "missing": (lambda d: d / "nope.pub.pem", "no such public key file"),
    "private": (
        lambda d: _write(d / "k.pem", _pem_private(Ed25519PrivateKey.generate())),
        "a private key; checking a certificate takes the public key",
    ),
    "rsa": (
        lambda d: _write(d / "rsa.pub.pem", _pem_public(rsa.generate_private_key(65537, 2048)), 0o644),
        "an RSA key, not an Ed25519 key",
    ),
    "not a key": (lambda d: _write(d / "junk.pem", b"hello\n", 0o644), "not a PEM public key"),
}


@pytest.mark.parametrize("case", sorted(BAD_PUBLIC))
def test_a_bad_public_key_fails_the_cli_with_one_line_naming_the_file(tmp_path, pair, capsys, case):
    cert = _signed(tmp_path, pair[0])
    make, expected = BAD_PUBLIC[case]
    path = make(tmp_path)
    rc, _, err = _cli(capsys, "certificate", "--verify", str(cert), "--public-key", str(path))
    assert rc == 1
    assert err.startswith(f"sisaflow: error: {path}: ") and expected in err and len(err.splitlines()) == 1


def test_which_key_signs(tmp_path, monkeypatch, pair):
    """--signing-key, else $SISAFLOW_SIGNING_KEY, else the workspace's key; the HMAC secret only without one."""
    ws = Workspace(tmp_path / "ws")
    assert signing_key(ws) is None
    monkeypatch.setenv(HMAC_KEY_ENV, "an-old-shared-secret")
    assert signing_key(ws) == b"an-old-shared-secret"
    own, _, own_fp = write_key_pair(ws.signing_key_file)
    chosen = signing_key(ws)
    assert isinstance(chosen, Ed25519PrivateKey) and fingerprint(chosen) == own_fp
    monkeypatch.setenv(SIGNING_KEY_ENV, str(pair[0]))
    assert fingerprint(signing_key(ws)) == fingerprint(load_private_key(pair[0]))
    other, _, other_fp = write_key_pair(tmp_path / "other.pem")
    assert fingerprint(signing_key(ws, other)) == other_fp


# ---- certificates ----


def test_an_ed25519_certificate_is_checked_with_the_public_key_alone(tmp_path, pair, capsys):
    private, public = pair
    path = _signed(tmp_path, private)
    cert = json.loads(path.read_text())
    fp = fingerprint(load_public_key(public))
    assert cert["signature"]["alg"] == "ed25519" and cert["signature"]["public_key_sha256"] == fp
    assert cert["retired_files"]["shard-3/slice-2"]["optimizer.safetensors"] == _h(12)
    assert verify_signature(cert, load_public_key(public)) and not verify_signature(cert, KEY)
    ok, message = verify_file(path, public_key=load_public_key(public))
    assert ok and message == f"{path}: valid: ed25519 signature by key {fp} matches; request req-1"
    rc, out, _ = _cli(capsys, "certificate", "--verify", str(path), "--public-key", str(public))
    assert rc == 0 and "valid" in out
    # without the public key it is not called valid, and an HMAC secret cannot stand in for it
    ok, message = verify_file(path, key=KEY)
    assert not ok and "no public key to check it with" in message
    assert "sha256" in path.with_suffix(".html").read_text() and fp in path.with_suffix(".html").read_text()


def test_a_certificate_signed_by_another_key_is_named(tmp_path, pair, capsys):
    path = _signed(tmp_path, pair[0])
    _, other_public, other_fp = write_key_pair(tmp_path / "other" / "k.pem")
    rc, out, _ = _cli(capsys, "certificate", "--verify", str(path), "--public-key", str(other_public))
    assert rc == 1 and len(out.splitlines()) == 1
    assert out.startswith(f"{path}: signed by another key") and other_fp in out
    # a signature of another key under this key's fingerprint does not pass either
    cert = json.loads(path.read_text())
    forged = sign(
        {k: v for k, v in cert.items() if k != "signature"}, load_private_key(tmp_path / "other/k.pem")
    )
    forged["signature"]["public_key_sha256"] = cert["signature"]["public_key_sha256"]
    path.write_text(json.dumps(forged))
    rc, out, _ = _cli(capsys, "certificate", "--verify", str(path), "--public-key", str(pair[1]))
    assert rc == 1 and "signature does not match" in out


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c["retired_files"]["shard-3/slice-3"].pop("optimizer.safetensors"),
        lambda c: c["content_hashes"].pop(),
        lambda c: c["request"].update(reason="another reason"),
        lambda c: c["signature"].update(value="0" * 128),
    ],
)
def test_any_change_breaks_an_ed25519_signature(tmp_path, pair, capsys, tamper):
    path = _signed(tmp_path, pair[0])
    cert = json.loads(path.read_text())
    tamper(cert)
    path.write_text(json.dumps(cert))
    rc, out, _ = _cli(capsys, "certificate", "--verify", str(path), "--public-key", str(pair[1]))
    assert (
        rc == 1
        and out == f"{path}: signature does not match: the certificate was changed or the key differs\n"
    )


def test_a_schema_invalid_certificate_fails_the_cli_naming_the_file(tmp_path, pair, capsys):
    path = _signed(tmp_path, pair[0])
    cert = json.loads(path.read_text())
    cert["retired_files"]["shard-3/slice-2"]["notes.txt"] = _h(1)
    path.write_text(json.dumps(cert))
    rc, out, _ = _cli(capsys, "certificate", "--verify", str(path), "--public-key", str(pair[1]))
    assert rc == 1 and len(out.splitlines()) == 1
    assert out.startswith(f"{path}: malformed certificate: retired_files.shard-3/slice-2: 'notes.txt'")
    rc, out, _ = _cli(capsys, "certificate", "--verify", str(tmp_path / "absent.json"))
    assert rc == 1 and out.startswith(f"{tmp_path / 'absent.json'}: cannot read")


def test_the_workspace_public_key_is_the_default_for_verify(tmp_path, capsys):
    ws = Workspace(tmp_path / "ws")
    write_key_pair(ws.signing_key_file)
    path = _signed(tmp_path, ws.signing_key_file)
    rc, out, _ = _cli(capsys, "--workspace", str(ws.root), "certificate", "--verify", str(path))
    assert rc == 0 and str(ws.public_key_file) in out


# ---- a third party's check: the README's lines, without sisaflow ----


def third_party_snippets() -> list[str]:
    """The Python blocks of README.md and docs/deletion.md that check a certificate with `cryptography` alone."""
    blocks = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "deletion.md"):
        found = [b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S) if "verify(" in b]
        assert len(found) == 1, f"{doc.name}: expected one certificate-checking snippet"
        blocks += found
    return blocks


def run_third_party_check(snippet: str, certificate: Path, public_key: Path, where: Path):
    """Run `snippet` as an outsider would, in a fresh interpreter (isolated: no sisaflow on the path unless it
    imports it), with the certificate and the public key under the names it reads."""
    assert "sisaflow" not in snippet
    names = re.findall(r'Path\("([^"]+)"\)', snippet)
    assert len(names) == 2, names
    where.mkdir(parents=True, exist_ok=True)
    (where / names[0]).write_bytes(certificate.read_bytes())
    (where / names[1]).write_bytes(public_key.read_bytes())
    return subprocess.run([sys.executable, "-I", "-c", snippet], cwd=where, capture_output=True, text=True)


def test_the_readme_snippet_checks_a_certificate_without_sisaflow(tmp_path, pair):
    snippets = third_party_snippets()
    assert snippets[0] == snippets[1], "README.md and docs/deletion.md show different checks"
    snippet = snippets[0]
    assert 6 <= len(snippet.strip().splitlines()) <= 12
    path = _signed(tmp_path, pair[0])
    ok = run_third_party_check(snippet, path, pair[1], tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    # it is a check: a changed certificate, or another key, fails it
    tampered = json.loads(path.read_text())
    tampered["retired_files"]["shard-3/slice-3"]["optimizer.safetensors"] = _h(99)
    (tmp_path / "t.json").write_text(json.dumps(tampered, indent=2))
    bad = run_third_party_check(snippet, tmp_path / "t.json", pair[1], tmp_path / "tampered")
    assert bad.returncode != 0 and "InvalidSignature" in bad.stderr
    _, other_public, _ = write_key_pair(tmp_path / "other.pem")
    bad = run_third_party_check(snippet, path, other_public, tmp_path / "other-key")
    assert bad.returncode != 0 and "AssertionError" in bad.stderr


def test_init_makes_the_signing_key_unless_told_not_to(tmp_path, capsys, monkeypatch):
    """Issue 25, point 9a: a workspace's certificates are signed unless someone chose otherwise. Mutant: init
    without the key pair: the notice says UNSIGNED and this fails."""
    from sisaflow.flows.signing import notice

    for name in ("SISAFLOW_SIGNING_KEY", "SISAFLOW_SIGNING_KEY_PEM", HMAC_KEY_ENV):
        monkeypatch.delenv(name, raising=False)
    src = tmp_path / "c.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"r{i}", "o": f"p{i % 2}", "text": f"note {i}"}) + "\n" for i in range(6))
    )
    common = ["--corpus", str(src), "--owner-field", "o", "--text-field", "text", "--shards", "2"]
    rc, printed, _ = _cli(capsys, "init", str(tmp_path / "signed"), *common)
    ws = Workspace(tmp_path / "signed")
    assert rc == 0 and stat.S_IMODE(ws.signing_key_file.stat().st_mode) == 0o600
    fp = fingerprint(load_private_key(ws.signing_key_file))
    assert f"signed with the Ed25519 key {fp[:16]}" in printed
    assert notice(str(ws.root)) == ("info", f"certificates are signed with the Ed25519 key {fp[:16]}")
    assert (
        subprocess.run(["git", "check-ignore", "-q", str(ws.signing_key_file)], cwd=ws.root).returncode == 0
    )
    rc, printed, _ = _cli(capsys, "init", str(tmp_path / "unsigned"), *common, "--no-signing-key")
    assert rc == 0 and not Workspace(tmp_path / "unsigned").signing_key_file.exists()
    assert notice(str(tmp_path / "unsigned"))[0] == "warning" and "signed with" not in printed
