"""LoRA constituents (peft): one adapter per shard over the frozen pretrained base.

Only the adapter is trained and checkpointed. Its weight file holds peft's adapter state dict (the keys of
`peft.get_peft_model_state_dict`, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so a
served copy also loads with peft directly. The adapter's initial weights depend only on the seed (peft draws A
from the global torch RNG, which is seeded here inside a forked RNG; B starts at zero).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from sisaflow.core.config import LoraParams, ModelParams
from sisaflow.core.errors import ConfigError, WorkspaceError
from sisaflow.models.pretrained import (
    check_context_length,
    check_target_modules,
    linear_layer_names,
    load_base_model,
)

ADAPTER = "default"
# an adapter weight key: the base module it adapts, and which factor (A: r x in, B: out x r)
ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def lora_config(lp: LoraParams):
    """The peft LoraConfig of params' model.lora."""
    from peft import LoraConfig

    return LoraConfig(
        r=lp.r,
        lora_alpha=lp.alpha,  # type: ignore[arg-type]  # peft annotates int; the scale alpha/r is a float anyway
        lora_dropout=lp.dropout,
        target_modules=list(lp.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_context(mp: ModelParams, base: nn.Module) -> None:
    """ConfigError if model.context_length exceeds what the base was trained for."""
    check_context_length(mp, getattr(base.config, "max_position_embeddings", None))


def attach_adapters(base: nn.Module, lp: LoraParams, names: list[str], seed: int) -> nn.Module:
    """Wrap `base` in peft with one freshly initialised adapter per name (base frozen); the first is active.

    ConfigError naming model.lora.target_modules, and the base's linear layers, if an entry names none of them."""
    from peft import get_peft_model

    check_target_modules(lp, base)
    cfg = lora_config(lp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = get_peft_model(base, cfg, adapter_name=names[0])  # type: ignore[arg-type]
            for name in names[1:]:
                model.add_adapter(name, cfg)
        except ValueError as exc:
            if "target" not in str(exc).lower():
                raise
            raise ConfigError(
                f"params: model.lora.target_modules = {lp.target_modules!r} does not fit the base model: {exc}. "
                f"Its linear layers, which can be targeted: {', '.join(linear_layer_names(base))}"
            ) from exc
    return model


def build_lora_model(mp: ModelParams, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """A constituent to train: the base (loaded from model.base, frozen) with one adapter initialised from `seed`.

    Only the adapter's parameters require grad."""
    if mp.base is None:
        raise ValueError("build_lora_model needs model.base")
    base = load_base_model(mp.base)
    check_context(mp, base)
    model = attach_adapters(base, mp.lora, [ADAPTER], seed)
    model.to(device)  # type: ignore[arg-type]  # in place
    return model


def is_lora(model: nn.Module) -> bool:
    """True for a peft-wrapped model, whose checkpoint holds the adapter only."""
    return hasattr(model, "peft_config")


def _param_name(key: str, adapter: str) -> str:
    # peft's state-dict key without the adapter name -> the parameter's name in the wrapped model
    return re.sub(r"\.lora_([AB])\.weight$", rf".lora_\1.{adapter}.weight", key)


def adapter_state(model: nn.Module, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights, keyed as peft's adapter files are, as contiguous CPU tensors."""
    out = {}
    tag = f".{adapter}."
    for name, p in model.named_parameters():
        if f".lora_A{tag}" in name or f".lora_B{tag}" in name:
            out[name.replace(tag, ".")] = p.detach().to("cpu").contiguous()
    if not out:
        raise ValueError(f"the model has no LoRA adapter named {adapter!r}")
    return out


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], adapter: str = ADAPTER) -> None:
    """Copy saved adapter weights into adapter `adapter` of `model`; WorkspaceError on any missing, extra or
    misshapen tensor (an adapter trained with other model.lora settings or another base)."""
    expected = set(adapter_state(model, adapter))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise WorkspaceError(
            f"adapter weights do not fit this base and model.lora settings (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); retrain with `sisaflow run`"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            p = model.get_parameter(_param_name(key, adapter))
            if p.shape != value.shape:
                raise WorkspaceError(
                    f"adapter weight {key} has shape {tuple(value.shape)}, the model expects {tuple(p.shape)}; "
                    "retrain with `sisaflow run`"
                )
            p.copy_(value)


def stack_adapters(
    adapters: list[dict[str, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted base module: (A stacked (S, r, in), B stacked (S, out, r)) over the S adapters.

    ValueError unless every adapter adapts the same modules with the same shapes."""
    if not adapters:
        raise ValueError("no adapters to stack")
    keys = set(adapters[0])
    for i, a in enumerate(adapters[1:], start=1):
        if set(a) != keys:
            raise ValueError(f"adapter {i} adapts other modules than adapter 0; they cannot be batched")
    modules: dict[str, dict[str, str]] = {}
    for key in sorted(keys):
        m = ADAPTER_KEY.match(key)
        if m is None:
            raise ValueError(f"{key!r} is not a LoRA adapter weight (lora_A / lora_B of a module)")
        modules.setdefault(m["module"], {})[m["factor"]] = key
    out = {}
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"module {module} has only lora_{''.join(pair)}")
        for key in pair.values():
            if len({tuple(a[key].shape) for a in adapters}) > 1:
                raise ValueError(
                    f"the adapters' {key} differ in shape (another lora.r?); they cannot be batched"
                )
        out[module] = (
            torch.stack([a[pair["A"]] for a in adapters]),
            torch.stack([a[pair["B"]] for a in adapters]),
        )
    return out
