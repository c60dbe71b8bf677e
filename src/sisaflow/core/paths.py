"""Every path sisaflow reads or writes, built in one place. All paths are absolute (Ray workers need that)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sisaflow.core.fsio import sha256_bytes


def shard_name(shard: int) -> str:
    """The directory name of a shard: shard-<n>."""
    return f"shard-{shard}"


@dataclass(frozen=True)
class Workspace:
    """A sisaflow workspace: params.yaml, dvc.yaml, prefect.yaml, and the data and models they produce."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    # configuration
    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_file(self) -> Path:
        return self.root / "dvc.yaml"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def prefect_file(self) -> Path:
        return self.root / "prefect.yaml"

    def source(self, corpus_path: str) -> Path:
        """The corpus source file named in params (relative to the workspace, or absolute)."""
        p = Path(corpus_path).expanduser()
        return p if p.is_absolute() else self.root / p

    # the imported corpus
    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def corpus_file(self) -> Path:
        return self.corpus_dir / "records.parquet"

    # deletion requests
    @property
    def deletions_dir(self) -> Path:
        return self.root / "deletions"

    @property
    def ledger_file(self) -> Path:
        return self.deletions_dir / "ledger.jsonl"

    # shards
    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard_dir(self, shard: int) -> Path:
        return self.shards_dir / shard_name(shard)

    def slice_file(self, shard: int, slice_: int) -> Path:
        return self.shard_dir(shard) / f"slice-{slice_}.parquet"

    def shard_manifest(self, shard: int) -> Path:
        return self.shard_dir(shard) / "manifest.json"

    @property
    def placement_file(self) -> Path:
        """Where every record was placed (shard, slice); slices are fixed at first placement."""
        return self.shards_dir / "placement.parquet"

    @property
    def sharding_file(self) -> Path:
        """The shard and slice counts the placement was made with."""
        return self.shards_dir / "sharding.json"

    # models
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_dir(self, shard: int) -> Path:
        return self.models_dir / shard_name(shard)

    def checkpoint_dir(self, shard: int, slice_: int) -> Path:
        return self.model_dir(shard) / f"slice-{slice_}"

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry"

    @property
    def registry_file(self) -> Path:
        return self.registry_dir / "ensemble.json"

    # runs: reports of what each run did (costs), not DVC-tracked
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def certificates_dir(self) -> Path:
        """reports/certificates/: one JSON and one HTML certificate per certified request (not in git)."""
        return self.root / "reports" / "certificates"

    @property
    def state_dir(self) -> Path:
        """Local, untracked state: Ray temp files, Prefect home, locks."""
        return self.root / ".sisaflow"

    @property
    def ray_tmp_dir(self) -> Path:
        # Ray's socket paths must stay short (< 108 bytes), so this lives in /tmp, keyed by the workspace.
        return Path("/tmp") / f"sisaflow-ray-{sha256_bytes(str(self.root).encode())[:10]}"

    @property
    def prefect_home(self) -> Path:
        return self.state_dir / "prefect"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "workspace.lock"

    # certificate signing keys: under .sisaflow/, which git ignores and no DVC output covers
    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def hash_key_file(self) -> Path:
        """The secret the workspace's record hashes are keyed with (core.hashing; mode 0600, never in git or DVC)."""
        return self.keys_dir / "hash-key"

    @property
    def signing_key_file(self) -> Path:
        """The Ed25519 private key `sisaflow keys init` writes (mode 0600)."""
        return self.keys_dir / "signing-key.pem"

    @property
    def public_key_file(self) -> Path:
        """Its public key: what an auditor checks certificates with."""
        return self.keys_dir / "signing-key.pub.pem"
