"""Generation speed of the served Ensemble (batched StackedLlama path, and the loop) against one model, S = 1..8.

Greedy on the combined mixture through `Ensemble.forward` with its cache, as `Ensemble.generate` runs it but never
stopping at end-of-text, so every run makes the same number of tokens; one model is a plain transformers model
with its KV cache (ensemble_speed.generate_one). Constituents are freshly initialised (speed does not depend on
the weights). The three take turns (ensemble_speed.rates) so that a slow spell of a shared machine falls on all.
"""

from __future__ import annotations

import functools

import torch
from ensemble_speed import PROMPT, generate_one, rates

from sisaflow.core.config import ModelParams
from sisaflow.inference.ensemble import Ensemble
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer


@torch.no_grad()
def generate_ensemble(ens: Ensemble, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy with the Ensemble's own forward and cache, `new` tokens."""
    out = ens(prompt, use_cache=True, logits_to_keep=1)
    tokens = []
    for step in range(new):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        if step + 1 < new:
            out = ens(token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def inference_rates(mp: ModelParams, sizes: list[int], new: int, repeats: int) -> list[dict]:
    """Per S: new tokens per second of one model, the batched ensemble and the loop ensemble (batch 1, prompt
    of PROMPT random tokens, prefill included), and whether both ensembles chose the same tokens."""
    tok = load_tokenizer(mp.tokenizer)
    models = [build_model(mp, tok.vocab_size, tok.eos_id, seed=i).eval() for i in range(max(sizes))]
    prompt = torch.randint(0, tok.eos_id, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    rows = []
    for s in sizes:
        weights = [1.0] * s
        batched = Ensemble(models[:s], weights, "mixture", tok, batched=True)
        loop = Ensemble(models[:s], weights, "mixture", tok, batched=False)
        if not batched.batched:
            raise RuntimeError("the constituents did not stack: the batched path is not what is measured")
        runs = {
            "one": functools.partial(generate_one, models[0], prompt),
            "batched": functools.partial(generate_ensemble, batched, prompt),
            "loop": functools.partial(generate_ensemble, loop, prompt),
        }
        r, chosen = rates(runs, 1, new, repeats, torch.device("cpu"))
        rows.append({"S": s, **r, "same_tokens": bool(torch.equal(chosen["batched"], chosen["loop"]))})
    return rows
