"""Decoding at graph speed: the stacked ensemble's prefill and decode step on fixed shapes, each captured once as
a CUDA graph and replayed.

A small model on a GPU is bound by kernel launches, not arithmetic: a StackedLlama step of the SmolLM2-135M
shape is some 900 kernels, and the host's time to launch them (through Python and the dispatcher) is what a step
costs. A CUDA graph records the kernels once and replays them with one launch. That needs every shape and every
address fixed, so `GraphDecoder` keeps, per shape (batch, prompt width, cache capacity):

- a static `StackedCache` (zeroed, so that masked positions hold finite numbers: attention multiplies them by a
  weight of exactly zero);
- the inputs as device tensors updated in place: the prompt, left-padded to the shape's width, and which of its
  positions are real; the current token of each row and its position (`StackedLlama.static_step` reads the
  rotary table and writes the cache there);
- the outputs: the combined log-probabilities, and the greedy token, written back as the next input and into
  the generated sequence, with the position advanced, all inside the graph;
- two graphs: the prefill (the whole prompt at once) and the decode step.

So greedy generation is one prefill replay and one decode replay per token with no host work between them; the
host looks at the generated tokens every `CHECK_EVERY` steps to stop once every row has ended. Sampling reads the
log-probabilities after each replay and draws on the host with the same per-row generators as
`Ensemble.generate`.

Shapes are bucketed so that a few graphs serve every request: the batch is padded with rows of token 0 up to the
next of `BATCH_BUCKETS` (a larger batch is cut into chunks of the largest), the prompt is left-padded to a
multiple of `WIDTH_STEP` (rotary positions are relative, so padding changes a row's numbers by float rounding
only), and the cache's capacity is the padded prompt plus the new tokens rounded up to a multiple of
`CAPACITY_STEP`. The `MAX_GRAPHS` most recently used shapes stay captured.

Where CUDA is absent (or with `capture=False`) the same static steps run eagerly: the CPU tests compare their
tokens and distributions with `Ensemble.generate`'s loop. `Ensemble.generate` uses this decoder on CUDA for a
stacked runner (from-scratch constituents, or LoRA adapters over a Llama base) unless `ensemble.cuda_graphs` is
false; everywhere else it keeps its eager loop. The mixture is computed in float64 on the CPU (as the eager path)
and float32 on CUDA (bf16 logits carry far less precision than either).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from sisaflow.core.config import PosteriorParams
from sisaflow.inference.combine import (
    combine_log_probs,
    mix_log_weights,
    posterior_log_weights,
    token_log_probs,
    top_constituents,
)
from sisaflow.inference.stacked import StackedLlama
from sisaflow.inference.stacked_cache import StackedCache

log = logging.getLogger("sisaflow.inference.graphed")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
"""Batch sizes a graph is captured for; a batch is padded up to the next, and a larger one cut into chunks."""
WIDTH_STEP = 16
"""A prompt is left-padded to a multiple of this many tokens (the prefill graph's width)."""
CAPACITY_STEP = 64
"""A graph's cache holds the padded prompt and the new tokens rounded up to a multiple of this."""
MAX_GRAPHS = 4
"""Captured shapes kept (least recently used dropped: each holds a cache and the graph's memory)."""
CHECK_EVERY = 8
"""Greedy decoding looks at the tokens (one host synchronisation) every this many steps, to stop early."""
WARMUP_STEPS = 2
"""Eager steps on a side stream before capture, as CUDA graph capture requires (libraries load their kernels)."""


def bucket(value: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` that holds `value`, or the largest when none does (the caller cuts)."""
    return next((b for b in buckets if b >= value), buckets[-1])


def draw(log_probs: torch.Tensor, temperature: float, gens: Sequence[torch.Generator]) -> list[int]:
    """One token per row of `log_probs` (B, V), drawn on the host at `temperature` from the row's own generator:
    how both decoding paths sample, so that a seed gives the same text either way."""
    probs = torch.softmax(log_probs / temperature, dim=-1).float().cpu()
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, gens)]


class _Shape:
    """One captured shape: the static cache, the steps' inputs and outputs (fixed addresses), and the graphs."""

    def __init__(
        self,
        stacked: StackedLlama,
        batch: int,
        width: int,
        capacity: int,
        mixture: torch.dtype,
        posterior: PosteriorParams | None = None,
    ):
        device = stacked.embed.device
        self.batch, self.width, self.capacity = batch, width, capacity
        self.cache: StackedCache = stacked.new_cache(batch, capacity)
        for t in (*self.cache.keys, *self.cache.values):
            t.zero_()  # masked positions are multiplied by exactly zero: they must hold finite numbers
        self.prompt = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.key_mask = torch.ones(batch, capacity, dtype=torch.bool, device=device)  # False: prompt padding
        positions = torch.arange(capacity, device=device)
        self.positions = positions
        self.prompt_positions = positions[:width].clone()
        # which key a prompt position may see, padding aside: the causal mask, and always itself (a padded query
        # then sees only itself, which keeps its unused output finite, as StackedLlama.forward does)
        self.causal = positions[None, :] <= self.prompt_positions[:, None]  # (width, capacity)
        self.itself = positions[None, :] == self.prompt_positions[:, None]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        # the token at each position (prompt positions unused); written at position + 1, hence one more
        self.sequence = torch.zeros(batch, capacity + 1, dtype=torch.long, device=device)
        vocab = (stacked.embed if stacked.lm_head is None else stacked.lm_head).shape[1]
        self.log_probs = torch.zeros(batch, vocab, dtype=mixture, device=device)
        if posterior is not None:  # the posterior's running state, per row, on the device
            n = stacked.num_models
            self.scores = torch.zeros(n, batch, dtype=mixture, device=device)
            self.last = torch.zeros(n, batch, vocab, dtype=mixture, device=device)
            self.selected = torch.zeros(batch, posterior.top_k or n, dtype=torch.long, device=device)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}


class GraphDecoder:
    """Greedy and sampled generation of a stacked ensemble (`StackedLlama`, from-scratch or LoRA), the prefill
    and decode step replayed from CUDA graphs on CUDA and run eagerly on the same static shapes elsewhere.

    `weights` are the mixture weights (float64, on the stacked model's device) and `combine` the ensemble's rule
    (mixture, product, or posterior with `posterior`'s settings: the running scores live on the device, the
    prefill scores every prompt position, each step adds the token it was fed; with top_k all S constituents
    still run, the others weighted zero). `capture` None captures where the model is on CUDA; `compile` runs torch.compile
    over each step before it is captured (inductor fuses its elementwise work into fewer kernels, at a
    compilation per shape)."""

    def __init__(
        self,
        stacked: StackedLlama,
        weights: torch.Tensor,
        combine: str,
        *,
        capture: bool | None = None,
        mixture_dtype: torch.dtype | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        posterior: PosteriorParams | None = None,
    ):
        self.stacked = stacked
        self.weights = weights
        self.combine = combine
        self.posterior = (posterior or PosteriorParams()) if combine == "posterior" else None
        cuda = stacked.embed.device.type == "cuda"
        self.capture = cuda if capture is None else capture
        if self.capture and not cuda:
            raise ValueError("capture=True needs the stacked model on a CUDA device")
        self.mixture_dtype = mixture_dtype or (torch.float32 if cuda else torch.float64)
        self._shapes: OrderedDict[tuple[int, int, int], _Shape] = OrderedDict()
        self.compiled = compile
        steps = {"prefill": self._prefill_step, "decode": self._decode_step}
        if compile:
            steps = {
                k: torch.compile(f, fullgraph=True, dynamic=False, backend=compile_backend)
                for k, f in steps.items()
            }
        self._steps = steps
        self.failure: str | None = None
        """Why capturing (or compiling) failed and the decoder went eager, or None."""

    @property
    def captured(self) -> list[tuple[int, int, int]]:
        """The (batch, prompt width, capacity) shapes held now, least recently used first."""
        return list(self._shapes)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        eos: int,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[list[int]]:
        """The new tokens of each row of `input_ids` (B, W), left-padded as `attention_mask` (None: no padding)
        says, up to `max_new_tokens` and before the first end-of-text: what `Ensemble.generate` gives (greedy at
        temperature 0, else sampling, each row from its own generator seeded by `seed`)."""
        rows = input_ids.shape[0]
        largest = BATCH_BUCKETS[-1]
        if rows > largest:  # rows are independent: chunks give what one batch would
            out: list[list[int]] = []
            for start in range(0, rows, largest):
                part = None if attention_mask is None else attention_mask[start : start + largest]
                out += self.generate(
                    input_ids[start : start + largest], part, max_new_tokens, eos, temperature, seed
                )
            return out
        if max_new_tokens <= 0:
            return [[] for _ in range(rows)]
        shape = self._start(input_ids, attention_mask, max_new_tokens)
        width = shape.width
        if temperature > 0:
            gens = [torch.Generator().manual_seed(seed) for _ in range(rows)]
            self._draw(shape, width, rows, temperature, gens)
        for step in range(1, max_new_tokens):
            self._run(shape, "decode")
            if temperature > 0:
                self._draw(shape, width + step, rows, temperature, gens)
                done = self._ended(shape, width + step, rows, eos)
            elif step % CHECK_EVERY == 0:
                done = self._ended(shape, width + step, rows, eos)
            else:
                done = False
            if done:
                break
        tokens = shape.sequence[:rows, width : width + max_new_tokens].tolist()
        return [row[: row.index(eos)] if eos in row else row for row in tokens]

    @torch.no_grad()
    def log_probs_along(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, continuation: torch.Tensor
    ) -> torch.Tensor:
        """The combined log-probabilities (B, N, V) the decoder gives before each token of `continuation`
        (B, N), fed in turn instead of its own choices (teacher forcing): how its distributions compare with
        another computation's along the same tokens, whatever either would have picked."""
        rows, steps = continuation.shape
        if rows > BATCH_BUCKETS[-1]:
            raise ValueError(f"log_probs_along takes at most {BATCH_BUCKETS[-1]} rows, not {rows}")
        shape = self._start(input_ids, attention_mask, steps)
        out = [shape.log_probs[:rows].clone()]
        for step in range(steps - 1):
            shape.tokens[:rows] = continuation[:, step : step + 1]
            shape.position.fill_(shape.width + step)
            self._run(shape, "decode")
            out.append(shape.log_probs[:rows].clone())
        return torch.stack(out, dim=1)

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new: int) -> _Shape:
        """The shape for these prompts, their tokens and padding in its inputs, and the prefill run: the first
        new token's log-probabilities and greedy choice are in place."""
        rows, given = input_ids.shape
        width = -(-given // WIDTH_STEP) * WIDTH_STEP
        shape = self._shape(bucket(rows, BATCH_BUCKETS), width, width + new)
        shape.prompt.zero_()
        shape.prompt[:rows, width - given :] = input_ids
        shape.key_mask.fill_(True)
        shape.key_mask[:rows, : width - given] = False
        if attention_mask is not None:
            shape.key_mask[:rows, width - given : width] = attention_mask.to(torch.bool)
        self._run(shape, "prefill")
        return shape

    def _shape(self, batch: int, width: int, needed: int) -> _Shape:
        """The shape for `batch` rows, a prompt of `width` and `needed` positions, made (and captured) on first
        use."""
        steps = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
        capacity = max(needed, min(steps, self.stacked.context_length))
        key = (batch, width, capacity)
        if key in self._shapes:
            self._shapes.move_to_end(key)
            return self._shapes[key]
        while len(self._shapes) >= MAX_GRAPHS:
            self._shapes.popitem(last=False)
        # extend the rotary table now: a graph must never see it replaced
        self.stacked.reserve_positions(capacity)
        shape = _Shape(self.stacked, batch, width, capacity, self.mixture_dtype, self.posterior)
        if self.capture:
            try:
                self._capture(shape)
            except Exception as exc:  # serve on, eagerly, rather than fail a request over a speed-up
                self._give_up(shape, exc)
        self._shapes[key] = shape
        return shape

    def _prefill_step(self, shape: _Shape) -> None:
        """The whole (padded) prompt at once, all on the device: the first new token of every row."""
        visible = (shape.key_mask[:, None, :] & shape.causal) | shape.itself
        if self.posterior is None:
            logits = self.stacked.static_step(shape.prompt, shape.prompt_positions, shape.cache, visible)
            shape.position.fill_(shape.width)
            self._choose(shape, torch.log_softmax(logits.to(self.mixture_dtype), dim=-1), None)
            return
        # the posterior reads the whole prompt: every position's log-probability of the next prompt token
        logits = self.stacked.static_step(
            shape.prompt, shape.prompt_positions, shape.cache, visible, every_position=True
        )
        lp = torch.log_softmax(logits.to(self.mixture_dtype), dim=-1)  # (S, B, W, V)
        real = shape.key_mask[:, : shape.width]
        counted = real[:, 1:] & real[:, :-1]
        read = token_log_probs(lp, shape.prompt)
        shape.scores.copy_(torch.where(counted, read, torch.zeros_like(read)).sum(-1))
        shape.last.copy_(lp[:, :, -1])
        log_w = posterior_log_weights(self.weights, shape.scores, self.posterior)
        if self.posterior.top_k is not None:  # the prompt is read: each row keeps its k
            shape.selected.copy_(top_constituents(log_w, self.posterior.top_k))
        shape.position.fill_(shape.width)
        self._choose(shape, lp[:, :, -1], log_w)

    def _decode_step(self, shape: _Shape) -> None:
        """One token for every row, all on the device."""
        visible = (shape.key_mask & (shape.positions <= shape.position))[:, None, :]
        logits = self.stacked.static_step(shape.tokens, shape.position, shape.cache, visible)
        shape.position.add_(1)
        lp = torch.log_softmax(logits.to(self.mixture_dtype), dim=-1)
        log_w = None
        if self.posterior is not None:  # the token fed now, as the last step's distributions scored it
            fed = shape.tokens[None].expand(lp.shape[0], -1, -1)
            shape.scores.add_(shape.last.gather(-1, fed).squeeze(-1))
            shape.last.copy_(lp)
            kept = shape.selected if self.posterior.top_k is not None else None
            log_w = posterior_log_weights(self.weights, shape.scores, self.posterior, kept)
        self._choose(shape, lp, log_w)

    def _choose(self, shape: _Shape, lp: torch.Tensor, log_w: torch.Tensor | None) -> None:
        """Combine the constituents' log-probabilities (S, B, V) (under the posterior's log-weights (S, B)
        when given), keep the result, and put the greedy token at the current position: the next step's input
        and the sequence's entry."""
        if log_w is not None:
            combined = mix_log_weights(lp, log_w)
        else:
            combined = combine_log_probs(lp, self.weights, self.combine)
        shape.log_probs.copy_(combined)
        chosen = combined.argmax(-1, keepdim=True)
        shape.tokens.copy_(chosen)
        shape.sequence.index_copy_(1, shape.position, chosen)

    def _capture(self, shape: _Shape) -> None:
        """Record the prefill and the decode step of `shape` as CUDA graphs, after warm-up runs on a side stream
        (on zeros: finite, and overwritten by each request's prefill)."""
        device = shape.tokens.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                for step in self._steps.values():
                    step(shape)
        torch.cuda.current_stream(device).wait_stream(stream)
        for name, step in self._steps.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(shape)
            shape.graphs[name] = graph
        log.info("captured batch %d, prompt %d, capacity %d", shape.batch, shape.width, shape.capacity)

    def _give_up(self, shape: _Shape, exc: Exception) -> None:
        """After a failed capture or compilation: run the plain steps eagerly from now on, and say why once."""
        self.failure = f"{type(exc).__name__}: {exc}"
        log.warning("CUDA graphs off for this ensemble, decoding eagerly: %s", self.failure)
        self.capture = False
        self._steps = {"prefill": self._prefill_step, "decode": self._decode_step}
        shape.graphs = {}

    def _run(self, shape: _Shape, name: str) -> None:
        graph = shape.graphs.get(name)
        if graph is not None:
            graph.replay()
        else:
            self._steps[name](shape)

    @staticmethod
    def _draw(
        shape: _Shape, position: int, rows: int, temperature: float, gens: list[torch.Generator]
    ) -> None:
        """Replace the greedy token at `position` of each real row by one drawn from the log-probabilities, as
        `Ensemble.generate` draws it (on the host, from the row's own generator)."""
        drawn = torch.tensor(draw(shape.log_probs[:rows], temperature, gens))
        shape.tokens[:rows, 0] = drawn.to(shape.tokens.device)
        shape.sequence[:rows, position] = shape.tokens[:rows, 0]

    @staticmethod
    def _ended(shape: _Shape, last: int, rows: int, eos: int) -> bool:
        """Whether every real row has made an end-of-text among its new tokens (one host synchronisation)."""
        return bool((shape.sequence[:rows, shape.width : last + 1] == eos).any(dim=1).all())
