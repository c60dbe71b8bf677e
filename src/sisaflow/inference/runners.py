"""The runner interface: what computes the constituents' logits for the Ensemble, and how one is chosen.

A runner takes a batch of token rows and returns every constituent's logits, shape (S, B, T, V), with the cache
to pass back for the next tokens. Four computations implement it: `StackedLlama` (from-scratch Llama
constituents of one architecture, or LoRA adapters over a Llama base, `sisaflow.inference.lora_runners.stacked_lora`),
`BatchedLora` (LoRA over any base whose adapted layers are `nn.Linear`), and the two loops that are the references:
`ModelLoop` (one forward per from-scratch model) and `PeftLoop` (one peft model, one adapter at a time).

Each batched runner states what it cannot take with a `*refusal` function that reads the models and changes
nothing (`StackedLlama.refusal`, `lora_runners.stacked_lora_refusal`, `lora_runners.batched_lora_refusal`); the
choice is made once, from those answers, before anything is built (`model_runner` here, `lora_runners.lora_runner`
for adapters), so no half-built runner is ever thrown away and the base is loaded once.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

import torch

from sisaflow.inference.stacked import StackedLlama

log = logging.getLogger("sisaflow.inference.runners")


class Runner(Protocol):
    """Every constituent's logits in one call; what `Ensemble.runner` holds."""

    batched: bool
    """True when one computation serves all constituents (what `Ensemble.batched` reports)."""

    @property
    def num_models(self) -> int: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, Any]:
        """Logits (S, B, T, V) for `input_ids` (B, T) and, with `use_cache`, the cache for the next call."""
        ...

    def select_cache_rows(self, cache: Any, rows: torch.Tensor) -> Any:
        """The cache of the rows `rows` names, in that order (beam search)."""
        ...


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which a transformers model takes its KV cache: transformers 5.2x renamed
    past_key_values to cache; either version is accepted."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache a transformers model output carries, read from the field the output declares (transformers
    5.2x warns on every read of the old name)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def select_rows_each(caches: list[Any], rows: torch.Tensor) -> list[Any]:
    """Reorder each of transformers' caches (one per constituent) to the rows `rows` names, in place."""
    for c in caches:
        c.reorder_cache(rows)
    return caches


class ModelLoop:
    """One forward per constituent model, one cache each: the reference computation, (S, B, T, V) logits."""

    batched = False

    def __init__(self, models: list[torch.nn.Module]):
        self.models = models
        self.num_models = len(models)

    def __call__(self, input_ids, attention_mask=None, cache=None, use_cache=False, logits_to_keep=0):
        """Logits (S, B, T, V) and, with use_cache, the list of the constituents' caches."""
        caches = cache or [None] * self.num_models
        outs = [
            m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{cache_kwarg(m): c},
            )
            for m, c in zip(self.models, caches)
        ]
        return torch.stack([o.logits for o in outs]), [cache_of(o) for o in outs] if use_cache else None

    def select_cache_rows(self, cache: list[Any], rows: torch.Tensor) -> list[Any]:
        """The caches of the rows `rows` names, in that order (beam search)."""
        return select_rows_each(cache, rows)


def model_runner(models: list[torch.nn.Module], batched: bool) -> Runner:
    """The runner for from-scratch constituents: with `batched`, one `StackedLlama` sharing the models' weights
    (one copy) when it takes them; else, or when it cannot (the reason is logged), the loop."""
    if batched:
        refusal = StackedLlama.refusal(models)
        if refusal is None:
            stacked = StackedLlama.from_models(models)  # type: ignore[arg-type]  # refusal checked the types
            stacked.share_with(models)  # type: ignore[arg-type]
            return stacked
        log.info("ensemble: evaluating the constituents one by one (%s)", refusal)
    return ModelLoop(models)
