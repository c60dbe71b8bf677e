"""What a flow run says about its signing key, and the key a secret store hands over as PEM text."""

from __future__ import annotations

import pytest

from sisaflow.core.paths import Workspace
from sisaflow.deletion import signing
from sisaflow.flows.signing import notice


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch):
    for name in (signing.SIGNING_KEY_ENV, signing.SIGNING_KEY_PEM_ENV, signing.HMAC_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


def test_a_run_without_a_key_warns_that_its_certificates_are_unsigned(tmp_path):
    level, line = notice(str(tmp_path))
    assert level == "warning" and "UNSIGNED" in line and "signing_key_secret" in line


def test_an_hmac_key_is_named_as_forgeable(tmp_path, monkeypatch):
    monkeypatch.setenv(signing.HMAC_KEY_ENV, "k" * 32)
    level, line = notice(str(tmp_path))
    assert level == "warning" and "HMAC" in line and "forge" in line


def test_the_workspace_key_is_named_by_its_fingerprint(tmp_path):
    ws = Workspace(tmp_path)
    _, _, fp = signing.write_key_pair(ws.signing_key_file)
    assert notice(str(tmp_path)) == ("info", f"certificates are signed with the Ed25519 key {fp[:16]}")


def test_pem_text_from_a_secret_store_signs_before_the_workspace_key(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    signing.write_key_pair(ws.signing_key_file)
    other = tmp_path / "elsewhere" / "key.pem"
    _, _, fp = signing.write_key_pair(other)
    monkeypatch.setenv(signing.SIGNING_KEY_PEM_ENV, other.read_text())
    key = signing.signing_key(ws)
    assert not isinstance(key, bytes) and key is not None and signing.fingerprint(key) == fp
    monkeypatch.setenv(signing.SIGNING_KEY_PEM_ENV, signing.public_key_path(other).read_text())
    with pytest.raises(signing.SigningKeyError, match=r"^\$SISAFLOW_SIGNING_KEY_PEM: not a PEM private key"):
        signing.signing_key(ws)


def test_a_secret_store_s_key_is_held_in_memory_and_no_subprocess_inherits_it(tmp_path):
    """Issue 25, point 3. Mutant: `run_signing_key` putting the PEM into os.environ (as the flows did through
    $SISAFLOW_SIGNING_KEY_PEM): the environment and the subprocess's see it, and this fails."""
    import os
    import subprocess
    import sys

    ws = Workspace(tmp_path)
    _, _, own = signing.write_key_pair(ws.signing_key_file)
    vault = tmp_path / "vault" / "key.pem"
    _, _, fp = signing.write_key_pair(vault)
    pem = vault.read_text()
    secret_line = pem.splitlines()[1]  # the base64 of the private key
    with signing.run_signing_key(pem, "the Prefect Secret block 'k'") as key:
        assert signing.fingerprint(key) == fp == signing.fingerprint(signing.signing_key(ws))
        assert notice(str(tmp_path)) == ("info", f"certificates are signed with the Ed25519 key {fp[:16]}")
        assert not any(secret_line in v for v in os.environ.values())
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(repr(dict(os.environ)))"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert secret_line not in child.stdout and "SISAFLOW_SIGNING_KEY_PEM" not in child.stdout
    assert signing.fingerprint(signing.signing_key(ws)) == own  # the run's key is gone after the run
    with pytest.raises(
        signing.SigningKeyError, match=r"^the Prefect Secret block 'k': not a PEM private key"
    ):
        with signing.run_signing_key(
            signing.public_key_path(vault).read_text(), "the Prefect Secret block 'k'"
        ):
            pass
