"""The signing key of a flow run, and what a run says about it when it starts.

A deployment can take the Ed25519 private key from a Prefect Secret block (the flows' `signing_key_secret`
parameter names it): the key is handed to the library in memory for the run only (`run_signing_key`): never put in
the environment, where every subprocess of the run would inherit it, and never written to disk. Otherwise the library's order holds (`sisaflow.deletion.signing.signing_key`). A run that
would issue unsigned certificates, or HMAC ones (whose checker can forge them), says so in its first lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from sisaflow.core.paths import Workspace
from sisaflow.deletion.signing import fingerprint, run_signing_key, signing_key


def notice(workspace: str) -> tuple[str, str]:
    """("info" or "warning", the line a run logs about the key its certificates will be signed with)."""
    key = signing_key(Workspace(Path(workspace)))
    if key is None:
        return "warning", (
            "certificates issued by this run will be UNSIGNED: no signing key (`sisaflow keys init` in the "
            "workspace, $SISAFLOW_SIGNING_KEY, or the deployment's signing_key_secret naming a Prefect Secret block)"
        )
    if isinstance(key, bytes):
        return "warning", (
            "certificates issued by this run will carry an HMAC signature ($SISAFLOW_CERTIFICATE_KEY): whoever can "
            "check one can also forge one; an Ed25519 key (`sisaflow keys init`) lets auditors check without that"
        )
    return "info", f"certificates are signed with the Ed25519 key {fingerprint(key)[:16]}"


@contextlib.contextmanager
def signing_key_from_secret(secret_name: str | None) -> Iterator[None]:
    """With `secret_name`, the Secret block's PEM text is the signing key for the body of the `with`."""
    if not secret_name:
        yield
        return
    from prefect.blocks.system import Secret

    secret = cast(Secret, Secret.load(secret_name))  # a Secret in a sync flow (load is sync-compatible)
    with run_signing_key(str(secret.get()), f"the Prefect Secret block {secret_name!r}"):
        yield


@contextlib.contextmanager
def signed_run(workspace: str, secret_name: str | None) -> Iterator[None]:
    """The key for the run (from the Secret block when named), and its notice in the flow run's log first."""
    from prefect import get_run_logger

    with signing_key_from_secret(secret_name):
        level, line = notice(workspace)
        getattr(get_run_logger(), level)(line)
        yield
