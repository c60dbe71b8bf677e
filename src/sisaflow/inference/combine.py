"""How the constituents' next-token distributions become the ensemble's: the one function every decoding path
(`Ensemble.forward`, the graph decoder, evaluation) applies."""

from __future__ import annotations

import torch


def combine_log_probs(log_probs: torch.Tensor, weights: torch.Tensor, combine: str) -> torch.Tensor:
    """Combine per-constituent log-probabilities of shape (S, ..., vocab) into (..., vocab): `mixture`,
    log(sum_i w_i p_i), or `product`, the normalised weighted mean of log-probabilities."""
    w = weights.to(log_probs.dtype).view(-1, *([1] * (log_probs.dim() - 1)))
    if combine == "mixture":
        return torch.logsumexp(log_probs + torch.log(w), dim=0)
    if combine == "product":
        return torch.log_softmax((log_probs * w).sum(dim=0), dim=-1)
    raise ValueError(f"unknown combine {combine!r}; choose mixture or product")
