"""A real S3-compatible server for tests: moto's server mode on a free loopback port, inside the test process.

Its objects live in the process (moto's backends), so a server stopped and started again on the same port holds
what it held. DVC reaches it through dvc-s3 with `endpointurl` set on the remote; credentials come from the
environment (moto accepts any), which `env()` gives for the test to set.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BUCKET = "sisaflow-test"


class S3Server:
    def __init__(self) -> None:
        self.port = 0
        self._server = None

    def start(self) -> S3Server:
        """Start (again, on the same port once it has one)."""
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = int(self._server.get_host_and_port()[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def env() -> dict[str, str]:
        """What boto needs to sign requests, and nothing that sends it to a metadata service."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def make_bucket(self, bucket: str = BUCKET) -> str:
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str = BUCKET, prefix: str = "") -> set[str]:
        """Every object key under `prefix` (relative to it)."""
        out: set[str] = set()
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out |= {o["Key"][len(prefix) :] for o in page.get("Contents", [])}
        return out


def use_as_dvc_remote(root: Path, server: S3Server, url: str, name: str = "storage") -> None:
    """Make `url` (s3://bucket/prefix) the workspace's default DVC remote `name`, at the test server."""
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "remote", "add", "-f", "-d", name, url], cwd=root, check=True, capture_output=True)
    subprocess.run(
        [dvc, "remote", "modify", "--local", name, "endpointurl", server.endpoint],
        cwd=root,
        check=True,
        capture_output=True,
    )
