"""Aggregation at inference: per token, a weighted combination of the constituents' next-token distributions.

`mixture` (default) is log(sum_i w_i p_i); `product` is the normalised weighted mean of log-probabilities.
The Ensemble's forward returns the combined log-probabilities as `.logits`, so generate-style code and
evaluation harnesses use it unchanged. Generation keeps one KV cache per constituent.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from sisaflow.checkpoint import load_weights
from sisaflow.config import ModelParams, Params
from sisaflow.errors import WorkspaceError
from sisaflow.ledger import read_ledger
from sisaflow.model import build_model
from sisaflow.paths import Workspace
from sisaflow.registry import read_registry, serving_view
from sisaflow.tokenizer import Tokenizer, load_tokenizer


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.2x renamed past_key_values to cache; accept either version
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output) -> object:
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


@dataclass
class EnsembleOutput:
    logits: torch.Tensor
    """Combined log-probabilities, shape (batch, seq, vocab)."""
    past_key_values: list[Any] | None = None


def combine_log_probs(log_probs: torch.Tensor, weights: torch.Tensor, combine: str) -> torch.Tensor:
    """Combine per-constituent log-probabilities of shape (S, ..., vocab) into (..., vocab)."""
    w = weights.to(log_probs.dtype).view(-1, *([1] * (log_probs.dim() - 1)))
    if combine == "mixture":
        return torch.logsumexp(log_probs + torch.log(w), dim=0)
    if combine == "product":
        return torch.log_softmax((log_probs * w).sum(dim=0), dim=-1)
    raise ValueError(f"unknown combine {combine!r}; choose mixture or product")


class Ensemble(torch.nn.Module):
    """The served ensemble: constituents, their weights, and the shared tokenizer."""

    weights: torch.Tensor

    def __init__(
        self, models: list[torch.nn.Module], weights: list[float], combine: str, tokenizer: Tokenizer
    ):
        super().__init__()
        if not models:
            raise WorkspaceError("the ensemble has no constituents")
        self.constituents = torch.nn.ModuleList(models)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float64))
        self.combine = combine
        self.tokenizer = tokenizer
        self.version = ""
        self.shards: list[int] = []
        self.excluded: list[int] = []

    @classmethod
    def load(cls, ws: Workspace, device: str = "cpu") -> Ensemble:
        """Load the served version from the registry, less every constituent a recorded deletion request
        excludes (unlearn.mode: exclude) until its retrained version is promoted."""
        reg = read_registry(ws)
        if not reg["constituents"]:
            raise WorkspaceError(
                "the served ensemble is empty: every record of the corpus has been deleted, so there is no model "
                "to generate or score with"
            )
        mode = Params.load(ws.params_file).unlearn.mode if ws.params_file.is_file() else "exclude"
        requested = {h for r in read_ledger(ws.ledger_file) for h in r.content_hashes}
        served, excluded = serving_view(ws, reg, mode, requested)
        if not served:
            raise WorkspaceError(
                f"every constituent (shards {', '.join(map(str, excluded))}) was trained on records of a recorded "
                "deletion request and is excluded until retrained: run `sisaflow run` to apply the request"
            )
        mp = ModelParams(**reg["model"])
        tok = load_tokenizer(mp.tokenizer)
        models = []
        for c in served:
            m = build_model(mp, tok.vocab_size, tok.eos_id, seed=0)
            load_weights(ws.root / c.get("served", c["checkpoint"]), m)
            m.to(device)  # type: ignore[arg-type]  # in place; transformers types .to oddly
            models.append(m.eval())
        weights = [c["records"] if reg["weights"] == "size" else 1.0 for c in served]
        ens = cls(models, weights, reg["combine"], tok)
        ens.version = reg["version"]
        ens.shards = [c["shard"] for c in served]
        ens.excluded = excluded
        return ens.to(device)

    @torch.no_grad()
    def forward(
        self, input_ids, attention_mask=None, past_key_values=None, use_cache=False
    ) -> EnsembleOutput:
        caches = past_key_values or [None] * len(self.constituents)
        outs = [
            m(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **{_cache_kwarg(m): c})
            for m, c in zip(self.constituents, caches)
        ]
        log_probs = torch.stack([torch.log_softmax(o.logits.double(), dim=-1) for o in outs])
        combined = combine_log_probs(log_probs, self.weights, self.combine)
        return EnsembleOutput(combined, [_cache_of(o) for o in outs] if use_cache else None)

    @torch.no_grad()
    def score(self, text: str) -> dict[str, float]:
        """Log-likelihood (nats) of `text` followed by end-of-text, as in training, and its perplexity."""
        ids = (self.tokenizer.encode(text) + [self.tokenizer.eos_id])[: self._context()]
        if len(ids) < 2:
            raise ValueError("a text needs at least one token to score")
        x = torch.tensor([ids], device=self.weights.device)
        lp = self(x).logits[0, :-1]
        token_lp = lp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
        ll = float(token_lp.sum())
        n = len(ids) - 1
        return {"tokens": n, "log_likelihood": ll, "perplexity": math.exp(-ll / n)}

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0) -> str:
        """Continue `prompt`: greedy when temperature is 0, else sampling; stops at end-of-text."""
        ids = self.tokenizer.encode(prompt)
        if not ids:
            ids = [self.tokenizer.eos_id]
        # a prompt longer than the context keeps its end, leaving room for the new tokens
        room = max(1, self._context() - max_new_tokens)
        ids = ids[-room:]
        budget = max(0, min(max_new_tokens, self._context() - len(ids)))
        gen = torch.Generator().manual_seed(seed)
        x = torch.tensor([ids], device=self.weights.device)
        out = self(x, use_cache=True)
        new: list[int] = []
        for _ in range(budget):
            lp = out.logits[0, -1]
            if temperature > 0:
                probs = torch.softmax(lp / temperature, dim=-1).float().cpu()
                token = int(torch.multinomial(probs, 1, generator=gen))
            else:
                token = int(lp.argmax())
            if token == self.tokenizer.eos_id:
                break
            new.append(token)
            out = self(
                torch.tensor([[token]], device=x.device), past_key_values=out.past_key_values, use_cache=True
            )
        return self.tokenizer.decode(new)

    def _context(self) -> int:
        return int(self.constituents[0].config.max_position_embeddings)  # type: ignore[union-attr,arg-type]
