"""LoRA constituents at inference: S adapters over one shared base, batched, or looped with peft as reference.

`BatchedLora` runs all S adapters in one forward per step. The batch carries the constituent: the B input rows
are repeated S times, constituent-major ((S*B, T): rows s*B..s*B+B-1 belong to adapter s). The base's weights
are shared and applied once to all S*B rows (one matmul of S times the rows, not S matmuls), and every adapted
linear layer adds scale * B_s A_s x to the rows of constituent s with two batched matmuls (`torch.bmm` over S).
The hidden states differ per constituent after the first adapted layer, which is why they carry the S dim.
Attention, norms, rotary embeddings, grouped key/value heads and the KV cache are the base model's own
(transformers), on a batch of S*B rows, so any transformers causal LM whose adapted layers are `nn.Linear` works.

`stacked_lora` is the leanest of the three where the base is a Llama that `StackedLlama` supports (SmolLM2 is):
the base's weights shared by all constituents and applied once to S times the rows, the adapters of each fused
projection (q/k/v, o, gate/up, down) concatenated so that one bmm and one baddbmm add every adapter's term.
Its forward is plain torch, not transformers' modules, so a step dispatches fewer operations than one
transformers model does (bench/ensemble_speed.py --lora BASE measures it).

`PeftLoop` is the straightforward computation: one peft model holding S named adapters, a Python loop that
activates each in turn, one cache per adapter. All three implement `sisaflow.inference.runners.Runner`: logits
(S, B, T, V) from the arguments of `StackedLlama.forward`, so the Ensemble drives any of them alike; `lora_runner`
asks each batched runner what it cannot take (`*_refusal`) and builds the one it picks, once.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from sisaflow.core.config import ModelParams
from sisaflow.inference.runners import Runner, cache_kwarg, cache_of, select_rows_each
from sisaflow.inference.stacked import StackedLlama
from sisaflow.models.lora import attach_adapters, check_context, load_adapter_state, stack_adapters
from sisaflow.models.pretrained import load_base_model

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

log = logging.getLogger("sisaflow.inference.lora_runners")


class StackedLoraLinear(nn.Module):
    """A frozen base linear layer plus S LoRA adapters, one per block of rows of the batch.

    Three operations per call whatever S is: the base matmul, x A_s^T for every s (one bmm), and
    `baddbmm`, which adds (x A_s^T)(scale B_s)^T to the base's output in the same kernel. The scale is folded
    into B once, at construction. On a small model every operation is a kernel launch, so this is what the
    batched ensemble pays per adapted layer over the base (peft pays five: two linears, a multiply, an add).
    Folding the scale and fusing the add round differently from peft's order of operations: the logits agree
    with the peft loop to within float rounding (tests/unit/models/test_lora.py states the tolerance)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        if a.shape[2] != base.in_features or b.shape[1] != base.out_features:
            raise ValueError(
                f"adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a linear layer "
                f"{base.in_features} -> {base.out_features}"
            )
        self.base = base
        dtype = base.weight.dtype
        # stored as A^T (S, in, r) and (scale B)^T (S, r, out): views of the stacked factors, so that a call
        # spends nothing on transposes (on a small model the host's time per operation is the cost)
        self.a_t = nn.Parameter(a.to(dtype).transpose(1, 2), requires_grad=False)
        self.b_t = nn.Parameter((b * scale).to(dtype).transpose(1, 2), requires_grad=False)
        self.num_models, self.in_features, self.out_features = a.shape[0], base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (S*B, ..., in), constituent-major; returns base(x) + scale * B_s A_s x per constituent's rows."""
        y = F.linear(x, self.base.weight, self.base.bias)
        n = self.num_models
        rows = x.reshape(n, -1, self.in_features)  # (S, B*T, in): a view, since the S blocks are contiguous
        low = torch.bmm(rows, self.a_t)  # (S, B*T, r)
        return torch.baddbmm(y.reshape(n, -1, self.out_features), low, self.b_t).view(y.shape)


class BatchedLora(nn.Module):
    """S LoRA adapters over one base model as one module whose forward returns (S, B, T, V) logits.

    Takes over `base`: its adapted linear layers are replaced in place. `adapters` are peft adapter state dicts
    (see `sisaflow.models.lora`), all adapting the same `nn.Linear` modules with the same rank; `scale` is alpha / r."""

    batched = True

    def __init__(self, base: nn.Module, adapters: list[dict[str, torch.Tensor]], scale: float):
        super().__init__()
        refusal = batched_lora_refusal(base, adapters)
        if refusal:
            raise ValueError(refusal)  # before any layer is replaced: `base` is left as it was
        self.num_models = len(adapters)
        for module, (a, b) in stack_adapters(adapters).items():
            parent_name, _, child = module.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, StackedLoraLinear(getattr(parent, child), a, b, scale))
        self.base = base
        self._cache_kw = cache_kwarg(base)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, Any]:
        """Logits (S, B, T, V) of every adapter for `input_ids` (B, T), and the base's cache (batch S*B)."""
        n, batch = self.num_models, input_ids.shape[0]
        out = self.base(
            input_ids=input_ids.repeat(n, 1),
            attention_mask=None if attention_mask is None else attention_mask.repeat(n, 1),
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{self._cache_kw: cache},
        )
        logits = out.logits
        return logits.view(n, batch, *logits.shape[1:]), cache_of(out) if use_cache else None

    def select_cache_rows(self, cache: Any, rows: torch.Tensor) -> Any:
        """The base's cache (adapter-major, S*B rows) of the rows `rows` names for every adapter, as many rows as
        it holds per adapter (beam search reorders its beams so)."""
        n, batch = self.num_models, rows.numel()
        offsets = torch.arange(n, device=rows.device).unsqueeze(1) * batch
        cache.reorder_cache((offsets + rows.unsqueeze(0)).reshape(-1))
        return cache


def batched_lora_refusal(base: nn.Module, adapters: list[dict[str, torch.Tensor]]) -> str | None:
    """Why `BatchedLora` cannot take these adapters over `base`, or None; reads them, changes nothing."""
    try:
        modules = stack_adapters(adapters)
    except ValueError as exc:  # adapters that differ in modules or shapes cannot be batched at all
        return str(exc)
    for module in modules:
        try:
            layer = base.get_submodule(module)
        except AttributeError:
            return f"the base has no module {module}"
        if not isinstance(layer, nn.Linear):
            return f"{module} is a {type(layer).__name__}; batched LoRA adapts nn.Linear only"
    return None


class PeftLoop(nn.Module):
    """The reference: S adapters in one peft model, evaluated one after another, one cache each."""

    batched = False

    def __init__(self, base: nn.Module, mp: ModelParams, adapters: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.names = [f"c{i}" for i in range(len(adapters))]
        self.model = attach_adapters(base, mp.lora, self.names, seed=0)  # random init, overwritten below
        for name, state in zip(self.names, adapters):
            load_adapter_state(self.model, state, adapter=name)
        self._cache_kw = cache_kwarg(base)
        self.num_models = len(adapters)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: list[Any] | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, list[Any] | None]:
        """Logits (S, B, T, V) and one cache per adapter (a list)."""
        caches = cache or [None] * self.num_models
        logits, new = [], []
        for name, c in zip(self.names, caches):
            self.model.set_adapter(name)  # type: ignore[operator]
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{self._cache_kw: c},
            )
            logits.append(out.logits)
            if use_cache:
                new.append(cache_of(out))
        return torch.stack(logits), new if use_cache else None

    def select_cache_rows(self, cache: list[Any], rows: torch.Tensor) -> list[Any]:
        """The adapters' caches of the rows `rows` names, in that order (beam search)."""
        return select_rows_each(cache, rows)


# where each adapted Llama linear layer sits in StackedLlama's fused projections: (projection, part)
_FUSED = {
    "self_attn.q_proj": ("qkv", 0),
    "self_attn.k_proj": ("qkv", 1),
    "self_attn.v_proj": ("qkv", 2),
    "self_attn.o_proj": ("o", 0),
    "mlp.gate_proj": ("gate_up", 0),
    "mlp.up_proj": ("gate_up", 1),
    "mlp.down_proj": ("down", 0),
}
_LAYER_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<name>[a-z_]+\.[a-z_]+)$")


def _fused_place(module: str) -> tuple[int, tuple[str, int]] | None:
    """(layer, (fused projection, part)) of an adapted Llama decoder module, or None for any other module."""
    m = _LAYER_MODULE.match(module)
    if m is None or m["name"] not in _FUSED:
        return None
    return int(m["layer"]), _FUSED[m["name"]]


def stacked_lora_refusal(base: nn.Module, adapters: list[dict[str, torch.Tensor]]) -> str | None:
    """Why `stacked_lora` cannot take these adapters over `base`, or None; reads them, changes nothing."""
    from transformers import LlamaForCausalLM

    if not isinstance(base, LlamaForCausalLM):
        return f"the base is a {type(base).__name__}, not a Llama"
    refusal = StackedLlama.refusal([base])
    if refusal:
        return refusal
    try:
        modules = stack_adapters(adapters)
    except ValueError as exc:
        return str(exc)
    ranks: dict[str, set[int]] = {}
    for module, (a, _) in modules.items():
        place = _fused_place(module)
        if place is None:
            return f"{module} is not a linear layer of a Llama decoder layer"
        ranks.setdefault(place[1][0], set()).add(int(a.shape[1]))
    for fused, r in ranks.items():
        if len(r) > 1:
            return f"the adapters of {fused} differ in rank ({sorted(r)})"
    return None


def stacked_lora(
    base: nn.Module, adapters: list[dict[str, torch.Tensor]], scale: float, context_length: int
) -> StackedLlama:
    """S LoRA adapters over a Llama base as one `StackedLlama`: the base's weights shared, each fused
    projection's adapters as one low-rank term (A's concatenated, scale * B's placed block by block).

    ValueError (the reason `stacked_lora_refusal` gives) when the base is not a Llama StackedLlama supports, or an
    adapter adapts another layer."""
    refusal = stacked_lora_refusal(base, adapters)
    if refusal:
        raise ValueError(refusal)
    llama = cast("LlamaForCausalLM", base)  # the refusal checked it
    cfg = llama.config
    heads = cfg.num_attention_heads
    kv, d = cfg.num_key_value_heads or heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    # (input width, output widths of the fused parts) of each fused projection
    shapes = {
        "qkv": (cfg.hidden_size, [heads * d, kv * d, kv * d]),
        "o": (heads * d, [cfg.hidden_size]),
        "gate_up": (cfg.hidden_size, [cfg.intermediate_size, cfg.intermediate_size]),
        "down": (cfg.intermediate_size, [cfg.hidden_size]),
    }
    placed: dict[str, dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, (a, b) in stack_adapters(adapters).items():
        layer, (fused, part) = _fused_place(module)  # type: ignore[misc]  # refusal checked every module
        placed.setdefault(fused, {})[(layer, part)] = (a, b)
    n, dtype = len(adapters), llama.model.embed_tokens.weight.dtype
    deltas = {}
    for fused, by_place in placed.items():
        width, outs = shapes[fused]
        offsets = [sum(outs[:p]) for p in range(len(outs) + 1)]
        used = sorted({part for _, part in by_place})  # the parts some layer adapts; the rest stay zero
        (rank,) = {a.shape[1] for a, _ in by_place.values()}  # one rank: refusal checked
        a_t = torch.zeros(cfg.num_hidden_layers, n, width, rank * len(used))
        b_t = torch.zeros(cfg.num_hidden_layers, n, rank * len(used), offsets[-1])
        for (layer, part), (a, b) in by_place.items():
            cols = slice(used.index(part) * rank, (used.index(part) + 1) * rank)
            a_t[layer, :, :, cols] = a.transpose(1, 2)
            b_t[layer, :, cols, offsets[part] : offsets[part + 1]] = (b * scale).transpose(1, 2)
        deltas[fused] = (a_t.to(dtype), b_t.to(dtype))
    return StackedLlama.from_models([llama], context_length=context_length, num_models=n, deltas=deltas)


def merged_model(
    mp: ModelParams,
    adapters: list[dict[str, torch.Tensor]],
    weights: list[float],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """One model: the base with the weighted mean of the adapters' weight deltas added to each adapted layer,
    W + (alpha / r) * sum_s w_s B_s A_s (w normalised to sum 1; computed in float64, stored in the base's dtype).

    A fixed function of the adapters, so exact adapters give an exact merge; it serves at one model's cost."""
    if mp.base is None:
        raise ValueError("merged_model needs model.base")
    base = load_base_model(mp.base)
    check_context(mp, base)
    if dtype is not None:
        base.to(dtype)  # type: ignore[arg-type]  # in place, before the deltas are added (float64 in tests)
    scale = mp.lora.alpha / mp.lora.r
    total = float(sum(weights))
    w = torch.tensor([x / total for x in weights], dtype=torch.float64)
    with torch.no_grad():
        for module, (a, b) in stack_adapters(adapters).items():  # a (S, r, in), b (S, out, r)
            layer = base.get_submodule(module)
            if not isinstance(layer, nn.Linear):
                raise ValueError(
                    f"{module} is a {type(layer).__name__}, not a linear layer; it cannot be merged"
                )
            delta = torch.einsum("s,sor,sri->oi", w, b.double(), a.double()) * scale
            layer.weight.add_(delta.to(layer.weight.dtype))
    base.to(device)  # type: ignore[arg-type]  # in place
    return base.eval()


def lora_runner(
    mp: ModelParams,
    adapters: list[dict[str, torch.Tensor]],
    batched: bool,
    device: str | torch.device = "cpu",
) -> tuple[Runner, int]:
    """Load the base once and put the adapters over it: (runner, context length). `batched` picks the leanest
    batched runner that takes this base and these adapters (`stacked_lora` for a supported Llama, else
    BatchedLora for any nn.Linear layers), asking each first, and else the peft loop; without `batched`, the
    peft loop. Why a batched runner was passed over is logged."""
    if mp.base is None:
        raise ValueError("lora_runner needs model.base")
    base = load_base_model(mp.base)
    check_context(mp, base)
    context = mp.context_length
    scale = mp.lora.alpha / mp.lora.r
    runner: nn.Module
    if not batched:
        runner = PeftLoop(base, mp, adapters)
    elif (stacked_refusal := stacked_lora_refusal(base, adapters)) is None:
        runner = stacked_lora(base, adapters, scale, context)
    elif (batched_refusal := batched_lora_refusal(base, adapters)) is None:
        log.info("LoRA ensemble: BatchedLora, not stacked_lora (%s)", stacked_refusal)
        runner = BatchedLora(base, adapters, scale)
    else:
        log.info(
            "LoRA ensemble: the peft loop (stacked_lora: %s; BatchedLora: %s)",
            stacked_refusal,
            batched_refusal,
        )
        runner = PeftLoop(base, mp, adapters)
    runner.to(device)
    return runner, context  # type: ignore[return-value]  # every choice above implements Runner
