"""Aggregation at inference: per token, a weighted combination of the constituents' next-token distributions.

`mixture` (default) is log(sum_i w_i p_i); `product` is the normalised weighted mean of log-probabilities.
The Ensemble's forward returns the combined log-probabilities as `.logits` and takes a cache back, so
generate-style code uses it unchanged; `sisaflow.inference.hf.EnsembleForCausalLM` puts it behind transformers' `generate()`,
pipelines and lm-evaluation-harness.

The constituents' logits come from a runner (`sisaflow.inference.runners`), chosen once when the ensemble is
built: `StackedLlama` (from-scratch constituents of one architecture, stacked weights, one batched forward per
step; or LoRA constituents over a Llama base, the base's weights shared and the adapters as batched low-rank
terms), `BatchedLora` (LoRA over any other base: one transformers forward over S times the rows, batched adapter
matmuls), or a Python loop over the constituents with one KV cache each (`ensemble.batched: false`, or
constituents the batched runners refuse). They agree within float32 rounding
(tests/unit/inference/test_stacked.py, tests/unit/models/test_lora.py state the tolerances).

An ensemble loaded for serving stays honest in a long-lived process: `generate` and `score` first check that the
deletion ledger and the registry have not changed in a way that changes what may be served (a request recorded
that excludes a loaded constituent, a new version promoted), and refuse with StaleEnsembleError if they have;
`Ensemble.load` again gives the current one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast, overload

import torch

from sisaflow.core.config import ModelParams, Params, PosteriorParams
from sisaflow.core.errors import WorkspaceError
from sisaflow.core.ledger import read_ledger
from sisaflow.core.paths import Workspace
from sisaflow.inference.combine import combine_log_probs
from sisaflow.inference.graphed import GraphDecoder, draw
from sisaflow.inference.registry import read_registry, serving_view
from sisaflow.inference.routing import RoutedCache, context_weights, posterior_step
from sisaflow.inference.runners import Runner, model_runner
from sisaflow.inference.stacked import StackedLlama
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import Tokenizer, load_tokenizer
from sisaflow.training.checkpoint import MODEL_FILE, load_weights


@dataclass
class EnsembleOutput:
    logits: torch.Tensor
    """Combined log-probabilities, shape (batch, seq, vocab)."""
    past_key_values: Any = None
    """What the next call takes back: a StackedCache, the base's cache (batched LoRA) or one cache per
    constituent (the loop)."""


def length_batches(
    rows: Sequence[Sequence[int]], batch_size: int, pad: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Token rows in batches of similar length: each batch's row indices and its (B, T) tensor, right-padded
    with `pad` (causal attention: a position never sees the padding after it)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        x = torch.full((len(chunk), max(len(rows[i]) for i in chunk)), pad, dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, : len(rows[i])] = torch.tensor(rows[i])
        yield chunk, x


class StaleEnsembleError(WorkspaceError):
    """The workspace now serves something else than this loaded ensemble: load it again."""


def served_stamp(ws: Workspace) -> tuple:
    """What changes when a request is recorded or a version promoted: the ledger's and the registry's files."""
    out: list[tuple[int, int, int] | None] = []
    for p in (ws.ledger_file, ws.registry_file):
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def _serving(ws: Workspace, mode: str) -> tuple[dict, list[dict], list[int]]:
    """(registry, constituents to serve, shards excluded) as of now."""
    reg = read_registry(ws)
    requested = {h for r in read_ledger(ws.ledger_file) for h in r.content_hashes}
    served, excluded = serving_view(ws, reg, mode, requested)
    return reg, served, excluded


class Ensemble(torch.nn.Module):
    """The served ensemble: constituents, their weights, and the shared tokenizer.

    From-scratch constituents are given as `models`; with `batched` (the default) they are stacked into one
    `StackedLlama` when they share one supported architecture, else evaluated in a loop; stacked, the models'
    weights become views of the stack, so the ensemble holds them once. LoRA constituents come as a ready
    `runner` (see `sisaflow.inference.lora_runners`) with `models` empty."""

    weights: torch.Tensor

    def __init__(
        self,
        models: list[torch.nn.Module],
        weights: list[float],
        combine: str,
        tokenizer: Tokenizer,
        batched: bool = True,
        *,
        runner: Runner | None = None,
        context_length: int | None = None,
        posterior: PosteriorParams | None = None,
    ):
        super().__init__()
        if not models and runner is None:
            raise WorkspaceError("the ensemble has no constituents")
        self.constituents = torch.nn.ModuleList(models)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float64))
        self.combine = combine
        self.posterior = posterior or PosteriorParams()
        """The posterior combination's settings (used with combine 'posterior' only)."""
        self.tokenizer = tokenizer
        self.version = ""
        self.shards: list[int] = []
        self.excluded: list[int] = []
        self.served_from: tuple[Workspace, str] | None = (
            None  # (workspace, unlearn.mode) when loaded to serve
        )
        self._stamp: tuple = ()
        self.runner: Runner = model_runner(models, batched) if runner is None else runner
        if self.runner.num_models != len(weights):
            raise ValueError(f"{self.runner.num_models} constituents but {len(weights)} weights")
        self.batched: bool = self.runner.batched
        if context_length is None:
            context_length = int(models[0].config.max_position_embeddings)  # type: ignore[union-attr,arg-type]
        self.context_length = context_length
        self.cuda_graphs = True
        """Generate on CUDA through `graph_decoder()` (params' ensemble.cuda_graphs)."""
        self.routing_fast = True
        """With posterior top_k: after the prompt, run only each row's kept constituents where the runner can
        (`StackedLlama.routed`); false computes them all and weighs the rest zero (the same numbers)."""
        self.compile_decode = False
        """`graph_decoder()` compiles the step before capturing it (params' ensemble.compile_decode)."""
        self._decoder: GraphDecoder | None = None
        self._decoder_made_for: tuple = ()

    @classmethod
    def load(
        cls,
        ws: Workspace,
        device: str = "cpu",
        batched: bool | None = None,
        respect_requests: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Ensemble:
        """Load the served version from the registry, less every constituent a recorded deletion request
        excludes (unlearn.mode: exclude) until its retrained version is promoted.

        `batched` None follows params' ensemble.batched. `respect_requests=False` loads every registered
        constituent, excluded or not: for measuring the model a deletion is about to replace, never for serving.
        `dtype` (e.g. torch.bfloat16 on a GPU) casts the constituents' weights; the mixture weights and the
        combination stay float64."""
        stamp = served_stamp(ws)  # before reading: a change while loading shows at the first check
        params = Params.load(ws.params_file) if ws.params_file.is_file() else Params()
        reg, served, excluded = _serving(ws, params.unlearn.mode if respect_requests else "keep")
        if not reg["constituents"]:
            raise WorkspaceError(
                "the served ensemble is empty: every record of the corpus has been deleted, so there is no model "
                "to generate or score with"
            )
        if not served:
            raise WorkspaceError(
                f"every constituent (shards {', '.join(map(str, excluded))}) was trained on records of a recorded "
                "deletion request and is excluded until retrained: run `sisaflow run` to apply the request"
            )
        batched = params.ensemble.batched if batched is None else batched
        mp = ModelParams(**reg["model"])
        weights = [c["records"] if reg["weights"] == "size" else 1.0 for c in served]
        dirs = [ws.root / c.get("served", c["checkpoint"]) for c in served]
        if mp.base is not None:
            ens = cls._load_lora(reg, mp, params, dirs, weights, batched, device)
        else:
            tok = load_tokenizer(mp.tokenizer)
            models = []
            for d in dirs:
                m = build_model(mp, tok.vocab_size, tok.eos_id, seed=0)
                load_weights(d, m)
                # cast before stacking: the constituents become views of the stacked weights (one copy), and
                # casting them afterwards would copy each again
                m.to(device=device, dtype=dtype)  # type: ignore[arg-type,call-arg]  # in place
                models.append(m.eval())
            ens = cls(models, weights, reg["combine"], tok, batched)
        ens.posterior = PosteriorParams(**reg.get("posterior", {}))
        ens.cuda_graphs = params.ensemble.cuda_graphs
        ens.compile_decode = params.ensemble.compile_decode
        ens.version = reg["version"]
        ens.shards = [c["shard"] for c in served]
        ens.excluded = excluded
        if respect_requests:
            ens.served_from, ens._stamp = (ws, params.unlearn.mode), stamp
        ens = ens.to(device)
        if dtype is not None:
            mixture = ens.weights
            ens.to(dtype=dtype)
            ens.weights = mixture  # kept float64: 1/3 in bfloat16 is 0.333984
        return ens

    def check_current(self) -> None:
        """Refuse (StaleEnsembleError) when the workspace would now serve other constituents or another version
        than this object holds; nothing to do for an ensemble not loaded to serve."""
        if self.served_from is None:
            return
        ws, mode = self.served_from
        stamp = served_stamp(ws)
        if stamp == self._stamp:
            return
        reg, served, _ = _serving(ws, mode)
        if reg["version"] != self.version or [c["shard"] for c in served] != self.shards:
            raise StaleEnsembleError(
                f"{ws.root}: the served ensemble changed since this one was loaded (a deletion request recorded, "
                f"or a new version promoted): now version {reg['version'] or '-'}, shards "
                f"{', '.join(str(c['shard']) for c in served) or 'none'}; load it again (Ensemble.load)"
            )
        self._stamp = stamp

    @classmethod
    def _load_lora(cls, reg, mp, params, dirs, weights, batched, device) -> Ensemble:
        from dataclasses import replace
        from pathlib import Path

        from safetensors.torch import load_file

        from sisaflow.core.base_files import PACKAGE_PREFIX, base_identity
        from sisaflow.inference.lora_runners import lora_runner, merged_model

        # the registry names the base as resolved when it was built; a workspace that moved since finds a
        # relative base through its params instead (the content hash below decides either way)
        spec = mp.base
        if not spec.startswith(PACKAGE_PREFIX) and not Path(spec).exists() and params.model.base:
            mp = replace(mp, base=params.model.base)
        now, trained = base_identity(mp.base), reg.get("base_sha256")
        if now != trained:
            raise WorkspaceError(
                f"params: model.base = {mp.base!r}: the base model is not the one the served adapters were trained "
                f"over: its content hash is now {now[:12]}, the registry's base_sha256 is {(trained or 'none')[:12]} "
                "(its files changed); run `sisaflow run` to retrain the adapters over it, or restore the base"
            )
        adapters = [load_file(str(d / MODEL_FILE)) for d in dirs]
        tok = load_tokenizer(mp.tokenizer, mp.base)
        if reg["combine"] == "merge":  # one model; its distribution is the "mixture" of one
            merged = merged_model(mp, adapters, weights, device)
            return cls([merged], [1.0], "mixture", tok, batched, context_length=mp.context_length)
        runner, context = lora_runner(mp, adapters, batched, device)
        return cls([], weights, reg["combine"], tok, runner=runner, context_length=context)

    @torch.no_grad()
    def forward(
        self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, logits_to_keep=0
    ) -> EnsembleOutput:
        """Combined log-probabilities (B, T, V) as `.logits` (the last `logits_to_keep` positions if > 0) and,
        with `use_cache`, the cache to pass back as `past_key_values` for the next tokens.

        With combine 'posterior' every position's log-probabilities are computed (each new token is context
        that moves the weights) and the cache is a `RoutedCache` carrying the rows' running scores."""
        routed = self.combine == "posterior"
        state = past_key_values if isinstance(past_key_values, RoutedCache) else None
        if state is not None and state.selected is not None and state.view is None and self._routes_rows():
            state = state.to_slots(self.runner)  # after the prompt: each row's top_k constituents only
        runner = state.view if state is not None and state.view is not None else self.runner
        logits, cache = runner(
            input_ids,
            attention_mask,
            cache=state.inner if state is not None else past_key_values,
            use_cache=use_cache,
            logits_to_keep=0 if routed else logits_to_keep,
        )
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        if not routed:
            combined = combine_log_probs(log_probs, self.weights, self.combine)
            return EnsembleOutput(combined, cache if use_cache else None)
        prior = self.weights if state is None else state.prior(self.weights)
        combined, routed_cache = posterior_step(
            log_probs, input_ids, attention_mask, prior, self.posterior, state, cache, use_cache
        )
        if 0 < logits_to_keep < combined.shape[1]:
            combined = combined[:, -logits_to_keep:]
        return EnsembleOutput(combined, routed_cache if use_cache else None)

    def select_cache_rows(self, cache: Any, rows: torch.Tensor) -> Any:
        """The cache `forward` returned, for the rows `rows` names, in that order (beam search)."""
        if isinstance(cache, RoutedCache):
            chosen = cache.select_rows((cache.view or self.runner).select_cache_rows(cache.inner, rows), rows)
            if cache.view is not None and chosen.selected is not None:  # each row's deltas follow it
                chosen.view = cast(StackedLlama, self.runner).routed(chosen.selected)
            return chosen
        return self.runner.select_cache_rows(cache, rows)

    def _routes_rows(self) -> bool:
        """Whether, after the prompt, the runner can compute only each row's top_k constituents (LoRA over a
        shared base, stacked); elsewhere every constituent runs and the others get weight zero."""
        return (
            self.routing_fast
            and isinstance(self.runner, StackedLlama)
            and self.runner.routing_refusal() is None
        )

    @torch.no_grad()
    def score(self, text: str) -> dict[str, float]:
        """Log-likelihood (nats) of `text` followed by end-of-text, as in training, and its perplexity."""
        self.check_current()
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
    def routing_weights(self, prompt: str) -> list[float]:
        """Each served constituent's weight (in `shards` order) for what follows `prompt`: with combine
        'posterior', where a continuation of it is routed (its floor and top_k applied); otherwise the fixed
        mixture weights. The prompt's tokens are all context (no end-of-text added)."""
        self.check_current()
        if self.combine != "posterior":
            return [float(w) for w in self.weights]
        ids = (self.tokenizer.encode(prompt) or [self.tokenizer.eos_id])[-self._context() :]
        x = torch.tensor([ids], device=self.weights.device)
        logits, _ = self.runner(x)
        weights = context_weights(torch.log_softmax(logits.double(), dim=-1), x, self.weights, self.posterior)
        return [float(w) for w in weights[:, 0]]

    @overload
    def generate(
        self, prompt: str, max_new_tokens: int = ..., temperature: float = ..., seed: int = ...
    ) -> str: ...

    @overload
    def generate(
        self, prompt: list[str], max_new_tokens: int = ..., temperature: float = ..., seed: int = ...
    ) -> list[str]: ...

    @torch.no_grad()
    def generate(
        self, prompt: str | list[str], max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0
    ) -> str | list[str]:
        """Continue `prompt`, or each of a list of prompts in one batch (left-padded; a list gives a list):
        greedy when temperature is 0, else sampling; a row stops at end-of-text.

        A batch gives each prompt what it gets alone (up to float rounding: rotary positions are relative, so
        left padding shifts nothing a prompt sees; a test compares): when sampling, each row draws from its own
        generator seeded by `seed`."""
        self.check_current()
        single = isinstance(prompt, str)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            return []
        x, mask = self.encode_prompts(prompts, max_new_tokens)
        budget = max(0, min(max_new_tokens, self._context() - x.shape[1]))
        decoder = self.graph_decoder()
        if decoder is not None:
            new = decoder.generate(x, mask, budget, self.tokenizer.eos_id, temperature, seed)
        else:
            new = self._generate_eager(x, mask, budget, temperature, seed)
        texts = [self.tokenizer.decode(t) for t in new]
        return texts[0] if single else texts

    def graph_decoder(self) -> GraphDecoder | None:
        """The decoder `generate` uses on CUDA: the stacked runner's steps captured as CUDA graphs
        (`sisaflow.inference.graphed`); None, so the eager loop, off CUDA, for a runner that is not stacked, or
        with `cuda_graphs` false. Made once and kept with its captured shapes, and made anew when what it
        captured changed: the ensemble moved or cast (the graphs read the old tensors' memory), or another
        combination or compile setting."""
        runner = self.runner
        if not self.cuda_graphs or not isinstance(runner, StackedLlama) or self.weights.device.type != "cuda":
            return None
        made_for = (
            self.weights.data_ptr(),
            runner.embed.data_ptr(),
            runner.embed.dtype,
            self.combine,
            self.posterior,
            self.compile_decode,
        )
        if self._decoder is None or self._decoder_made_for != made_for:
            self._decoder = GraphDecoder(
                runner, self.weights, self.combine, compile=self.compile_decode, posterior=self.posterior
            )
            self._decoder_made_for = made_for
        return self._decoder

    def _generate_eager(
        self, x: torch.Tensor, mask: torch.Tensor | None, budget: int, temperature: float, seed: int
    ) -> list[list[int]]:
        """`generate`'s loop, every step's kernels launched from here: the new tokens of each row."""
        eos = self.tokenizer.eos_id
        rows = x.shape[0]
        device = self.weights.device
        gens = [torch.Generator().manual_seed(seed) for _ in range(rows)]
        out = self(x, attention_mask=mask, use_cache=True, logits_to_keep=1)
        new: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        for _ in range(budget):
            lp = out.logits[:, -1]
            if temperature > 0:
                tokens = draw(lp, temperature, gens)
            else:
                tokens = lp.argmax(-1).tolist()
            for i, token in enumerate(tokens):
                if done[i] or token == eos:
                    done[i] = True
                else:
                    new[i].append(token)
            if all(done):
                break
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            out = self(
                torch.tensor([[t] for t in tokens], device=device),
                attention_mask=mask,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return new

    def encode_prompts(
        self, prompts: Sequence[str], max_new_tokens: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, W) of `prompts`, left-padded with end-of-text on the ensemble's device, and the attention
        mask (None when no row is padded). An empty prompt starts from end-of-text; a prompt longer than the
        context keeps its end, leaving room for `max_new_tokens`."""
        eos = self.tokenizer.eos_id
        room = max(1, self._context() - max_new_tokens)
        rows = [(self.tokenizer.encode(p) or [eos])[-room:] for p in prompts]
        width = max(len(r) for r in rows)
        device = self.weights.device
        x = torch.tensor([[eos] * (width - len(r)) + r for r in rows], device=device)
        if all(len(r) == width for r in rows):
            return x, None
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        return x, mask

    def _context(self) -> int:
        return self.context_length
