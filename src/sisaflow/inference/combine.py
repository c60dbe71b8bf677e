"""How the constituents' next-token distributions become the ensemble's: the functions every decoding path
(`Ensemble.forward`, the graph decoder, evaluation, the benches) applies.

`mixture` and `product` weigh the constituents by fixed weights pi (uniform, or by shard size). `posterior`
weighs them by the context: before token t, constituent k's weight is

    w_k(t) = pi_k exp(beta * L_k(t)) / sum_j pi_j exp(beta * L_j(t)),   L_k(t) = sum_{i<t} log p_k(x_i | x_<i)

over the real tokens seen so far (padding never counts), mixed with a uniform floor, w <- (1 - floor) w +
floor / S, and optionally cut to the top k constituents. With beta 1 and no floor it is exactly the mixture of
the constituents' whole-sequence probabilities, sum_k pi_k p_k(x_1..x_T): Bayes' rule over "which constituent
wrote this text" (Branch-Train-Merge's ensembling, Li et al. 2022), never more than ln(1/pi_k) / T nats per token
worse than the best single constituent k on a T-token text. Scoring each constituent against the frozen base
(L_k - L_base) would change nothing: the base's term is the same for every k and cancels in the normalisation.
"""

from __future__ import annotations

import math

import torch

from sisaflow.core.config import PosteriorParams


def combine_log_probs(log_probs: torch.Tensor, weights: torch.Tensor, combine: str) -> torch.Tensor:
    """Combine per-constituent log-probabilities of shape (S, ..., vocab) into (..., vocab): `mixture`,
    log(sum_i w_i p_i), or `product`, the normalised weighted mean of log-probabilities. (`posterior` needs the
    context: `mix_log_weights` with `posterior_log_weights`.)"""
    w = weights.to(log_probs.dtype).view(-1, *([1] * (log_probs.dim() - 1)))
    if combine == "mixture":
        return torch.logsumexp(log_probs + torch.log(w), dim=0)
    if combine == "product":
        return torch.log_softmax((log_probs * w).sum(dim=0), dim=-1)
    raise ValueError(f"unknown combine {combine!r}; choose mixture or product (posterior takes the context)")


def mix_log_weights(log_probs: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """log(sum_k w_k p_k) of log-probabilities (S, ..., vocab) under per-position log-weights (S, ...).

    Summed constituent by constituent: memory holds one (..., vocab) sum beside the input, not S more (a
    forward over 16 records of 150 tokens at S=4 over a 49,152-token vocabulary is 3.8 GB in float64)."""
    weights = log_weights.to(log_probs.dtype)
    out = log_probs[0] + weights[0].unsqueeze(-1)
    for k in range(1, log_probs.shape[0]):
        out = torch.logaddexp(out, log_probs[k] + weights[k].unsqueeze(-1))
    return out


def posterior_log_weights(
    prior: torch.Tensor,
    scores: torch.Tensor,
    posterior: PosteriorParams,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """The posterior rule's log-weights (S, B, ...) from the prior weights pi (S,), or (S, B) per row, and the
    running log-likelihoods L (S, B, ...) of the context so far.

    `selected` (B, k): the constituents each row keeps (chosen once, after the prompt); otherwise, with
    `posterior.top_k`, the k highest at each position. The floor is spread over the kept constituents only, and
    the others get weight exactly zero."""
    shape = (*prior.shape, *([1] * (scores.dim() - prior.dim())))  # (S,) or, routed per row, (k, B)
    logits = torch.log(prior.to(scores.dtype)).view(shape) + posterior.beta * scores
    n = logits.shape[0]
    keep: torch.Tensor | None = None
    if selected is not None:
        rows = torch.zeros(n, selected.shape[0], dtype=torch.bool, device=scores.device)
        rows.scatter_(0, selected.T, True)
        keep = rows.view(*rows.shape, *([1] * (scores.dim() - 2))).expand_as(logits)
    elif posterior.top_k is not None and posterior.top_k < n:
        top = logits.topk(posterior.top_k, dim=0).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(0, top, True)
    if keep is not None:
        logits = logits.masked_fill(~keep, -math.inf)
    log_w = logits - torch.logsumexp(logits, dim=0, keepdim=True)
    if posterior.floor > 0:
        # known without reading the mask (a host synchronisation would break a captured CUDA graph)
        kept = n if keep is None else selected.shape[1] if selected is not None else int(posterior.top_k or n)
        log_w = torch.logaddexp(
            log_w + math.log1p(-posterior.floor), torch.full_like(log_w, math.log(posterior.floor / kept))
        )
        if keep is not None:
            log_w = log_w.masked_fill(~keep, -math.inf)
    return log_w


def top_constituents(log_weights: torch.Tensor, k: int) -> torch.Tensor:
    """The k constituents (B, k) of highest weight per row, from log-weights (S, B): what a row keeps after its
    prompt under `posterior.top_k`."""
    return log_weights.topk(min(k, log_weights.shape[0]), dim=0).indices.T.contiguous()


def token_log_probs(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p_k(ids[:, t+1] | ids[:, :t+1]) for t = 0..T-2: shape (S, B, T-1) of log-probabilities (S, B, T, V)
    over the token rows `ids` (B, T)."""
    target = ids[:, 1:].unsqueeze(0).expand(log_probs.shape[0], -1, -1).unsqueeze(-1)
    return log_probs[:, :, :-1].gather(-1, target).squeeze(-1)


def running_scores(
    token_lp: torch.Tensor, counted: torch.Tensor | None, start: torch.Tensor | None = None
) -> torch.Tensor:
    """L (S, B, N): at position t, `start` (S, B) plus the sum of `token_lp` (S, B, N) over positions 0..t where
    `counted` (B, N) holds (all when None): each constituent's log-likelihood of the context a position sees."""
    contrib = token_lp if counted is None else torch.where(counted, token_lp, torch.zeros_like(token_lp))
    out = contrib.cumsum(dim=-1)
    return out if start is None else out + start.unsqueeze(-1)
