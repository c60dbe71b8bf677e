"""The posterior combination's state across a cached generation: each row's running log-likelihood under every
constituent, carried next to the runner's KV cache.

`Ensemble.forward` with `combine: posterior` calls `posterior_step` once per call: the new tokens' log-probabilities
(every position, not just the last: each is a token of the context) update the running scores, each position is
combined under the weights of the context it sees (`sisaflow.inference.combine.posterior_log_weights`), and the
state goes back out in a `RoutedCache` with the runner's own cache inside. A forward over a whole text without a
cache gives the same numbers as feeding it token by token (up to the order of float64 sums: 1e-12).

A token counts when it and the token before it are real (the attention mask): left padding, and the prompt's first
token (nothing predicts it), never do. With `top_k`, the first cached call (the prompt) chooses the rows'
constituents and every later call keeps them; a forward without a cache keeps the k highest at each position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sisaflow.core.config import PosteriorParams
from sisaflow.inference.combine import (
    mix_log_weights,
    posterior_log_weights,
    running_scores,
    token_log_probs,
    top_constituents,
)


@dataclass
class RoutedCache:
    """The runner's cache (`inner`) and, per row of the batch, what the posterior has read so far."""

    inner: Any
    scores: torch.Tensor
    """(S, B) float64: each constituent's log-likelihood of the row's real tokens so far."""
    last: torch.Tensor
    """(S, B, V): the constituents' log-probabilities at the row's last position (they score the next token)."""
    last_real: torch.Tensor
    """(B,) bool: whether that last position was a real token."""
    selected: torch.Tensor | None = None
    """(B, k): the constituents each row keeps (posterior top_k), chosen after the prompt; None: all."""
    view: Any = None
    """The runner that computes only the kept constituents (`StackedLlama.routed`), once switched to it: then
    `inner`, `scores` and `last` hold k slots per row (slot j of row b is constituent selected[b, j])."""

    def get_seq_length(self) -> int:
        """The cached length, as transformers' caches report it (generate() reads it)."""
        inner = self.inner[0] if isinstance(self.inner, list) else self.inner
        return int(inner.get_seq_length())

    def select_rows(self, inner: Any, rows: torch.Tensor) -> RoutedCache:
        """This state for the rows `rows` names, in that order (beam search), around the runner's `inner` cache
        of those rows."""
        rows = rows.to(self.scores.device)
        return RoutedCache(
            inner,
            self.scores.index_select(1, rows),
            self.last.index_select(1, rows),
            self.last_real.index_select(0, rows),
            None if self.selected is None else self.selected.index_select(0, rows),
        )

    def to_slots(self, runner: Any) -> RoutedCache:
        """This state, after the prompt, moved onto `runner.routed(selected)`: each row's kept constituents only
        (their cache, scores and last log-probabilities), so that every later step costs k constituents."""
        assert self.selected is not None and self.view is None
        slots = self.selected.T.to(self.scores.device)  # (k, B)
        rows = torch.arange(slots.shape[1], device=slots.device)[None, :]
        return RoutedCache(
            self.inner.select_models(self.selected),
            self.scores[slots, rows],
            self.last[slots, rows],
            self.last_real,
            self.selected,
            runner.routed(self.selected),
        )

    def prior(self, weights: torch.Tensor) -> torch.Tensor:
        """The prior weights in this state's layout: (S,) as given, or (k, B) per slot once routed."""
        if self.view is None or self.selected is None:
            return weights
        return weights[self.selected.T.to(weights.device)]


def posterior_step(
    log_probs: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prior: torch.Tensor,
    posterior: PosteriorParams,
    state: RoutedCache | None,
    inner: Any,
    use_cache: bool,
) -> tuple[torch.Tensor, RoutedCache | None]:
    """The combined log-probabilities (B, T, V) of the constituents' `log_probs` (S, B, T, V) for `input_ids`
    (B, T) after the context `state` holds (None: nothing before), and the state after them around the runner's
    cache `inner` (None without `use_cache` or a state)."""
    rows, steps = input_ids.shape
    device = log_probs.device
    real = (
        torch.ones(rows, steps, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask[:, -steps:].to(device=device, dtype=torch.bool)
    )
    within = token_log_probs(log_probs, input_ids.to(device))  # (S, B, T-1): x_1.. predicted inside this call
    counted = real[:, 1:] & real[:, :-1]
    if state is not None:  # the first new token, predicted by the last cached position
        first = state.last.gather(-1, input_ids[:, :1].to(device).unsqueeze(0).expand(len(prior), -1, -1))
        within = torch.cat([first, within], dim=-1)
        counted = torch.cat([(real[:, 0] & state.last_real)[:, None], counted], dim=1)
        scores = running_scores(within, counted, state.scores)  # (S, B, T)
    else:  # position 0 has seen one token, which nothing scored
        zero = torch.zeros(log_probs.shape[0], rows, 1, dtype=log_probs.dtype, device=device)
        scores = torch.cat([zero, running_scores(within, counted)], dim=-1)
    selected = state.selected if state is not None else None
    view = state.view if state is not None else None
    # routed onto the kept constituents, every slot is kept: the mask is already in the layout
    log_w = posterior_log_weights(prior, scores, posterior, selected if view is None else None)
    combined = mix_log_weights(log_probs, log_w)
    if not use_cache and state is None:
        return combined, None
    if selected is None and posterior.top_k is not None:  # the prompt is read: the rows choose
        selected = top_constituents(log_w[:, :, -1], posterior.top_k)
    return combined, RoutedCache(
        inner, scores[:, :, -1].clone(), log_probs[:, :, -1].clone(), real[:, -1].clone(), selected, view
    )


def context_weights(
    log_probs: torch.Tensor, ids: torch.Tensor, prior: torch.Tensor, posterior: PosteriorParams
) -> torch.Tensor:
    """Each constituent's weight (S, B) after the whole of each row `ids` (B, T) (no padding): where the
    posterior would route a continuation of it (`sisaflow evaluate` reports these for forgotten records)."""
    scores = running_scores(token_log_probs(log_probs, ids), None)[:, :, -1]
    return posterior_log_weights(prior, scores, posterior).exp()
