"""Decoding at graph speed: the stacked ensemble's decode step on fixed shapes, captured once as a CUDA graph.

A small model on a GPU is bound by kernel launches, not arithmetic: a StackedLlama step of the SmolLM2-135M
shape dispatches some 700 kernels, and the host's time to launch them (tens of microseconds each, through Python
and the dispatcher) is what a step costs. A CUDA graph records the kernels of one step once and replays them with
one launch. That needs every shape and every address fixed, so `GraphDecoder` keeps, per captured shape:

- a static `StackedCache` of `capacity` positions for `batch` rows (zeroed, so that masked positions hold finite
  numbers: attention multiplies them by a weight of exactly zero);
- the step's inputs as device tensors it updates in place: the current token of each row, the position
  (`StackedLlama.decode_step` reads the rotary table and writes the cache at it), and which cached positions each
  row may see (its prompt's padding masked, positions after the current one masked);
- the step's outputs: the combined log-probabilities, and the greedy token, written back as the next input and
  into the generated sequence, with the position advanced, all inside the graph.

So greedy decoding replays the graph token after token with no host work between replays; the host looks at the
generated tokens every `CHECK_EVERY` steps to stop once every row has ended. Sampling reads the log-probabilities
after each replay and draws on the host with the same per-row generators as `Ensemble.generate`.

Shapes are bucketed so that a few graphs serve every request: the batch is padded with rows of end-of-text up to
the next of `BATCH_BUCKETS` (a larger batch is cut into chunks of the largest), and the cache's capacity is the
prompt width plus the new tokens rounded up to a multiple of `CAPACITY_STEP`. The prompt's prefill runs through
`StackedLlama.forward` into the same static cache (its length varies; it is one call per request). The
`MAX_GRAPHS` most recently used shapes stay captured.

Where CUDA is absent (or with `capture=False`) the same static step runs eagerly: the CPU tests compare its tokens
and distributions with `Ensemble.generate`'s loop. `Ensemble.generate` uses this decoder on CUDA for a stacked
runner (from-scratch constituents, or LoRA adapters over a Llama base) unless `ensemble.cuda_graphs` is false;
everywhere else it keeps its eager loop. The mixture is computed in float64 on the CPU (as the eager path) and
float32 on CUDA (the combination of S distributions over a vocabulary per row and step; float32 keeps it inside
the graph's memory traffic budget, and bf16 logits carry far less precision than either).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from sisaflow.inference.combine import combine_log_probs
from sisaflow.inference.stacked import StackedLlama
from sisaflow.inference.stacked_cache import StackedCache

log = logging.getLogger("sisaflow.inference.graphed")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
"""Batch sizes a graph is captured for; a batch is padded up to the next, and a larger one cut into chunks."""
CAPACITY_STEP = 64
"""A graph's cache holds the prompt and the new tokens rounded up to a multiple of this."""
MAX_GRAPHS = 4
"""Captured shapes kept (least recently used dropped: each holds a cache and the graph's memory)."""
CHECK_EVERY = 8
"""Greedy decoding looks at the tokens (one host synchronisation) every this many steps, to stop early."""
WARMUP_STEPS = 2
"""Eager steps on a side stream before capture, as CUDA graph capture requires (libraries load their kernels)."""


def bucket(value: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` that holds `value`, or the largest when none does (the caller cuts)."""
    return next((b for b in buckets if b >= value), buckets[-1])


class _Shape:
    """One captured shape: the static cache, the step's inputs and outputs (fixed addresses), and its graph."""

    def __init__(self, stacked: StackedLlama, batch: int, capacity: int, mixture: torch.dtype):
        device = stacked.embed.device
        self.batch, self.capacity = batch, capacity
        self.cache: StackedCache = stacked.new_cache(batch, capacity)
        for t in (*self.cache.keys, *self.cache.values):
            t.zero_()  # masked positions are multiplied by exactly zero: they must hold finite numbers
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.key_mask = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.positions = torch.arange(capacity, device=device)
        # the token at each position (prompt positions unused); written at position + 1, hence one more
        self.sequence = torch.zeros(batch, capacity + 1, dtype=torch.long, device=device)
        vocab = (stacked.embed if stacked.lm_head is None else stacked.lm_head).shape[1]
        self.log_probs = torch.zeros(batch, vocab, dtype=mixture, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None


class GraphDecoder:
    """Greedy and sampled generation of a stacked ensemble (`StackedLlama`, from-scratch or LoRA), the decode
    step replayed from a CUDA graph on CUDA and run eagerly on the same static shapes elsewhere.

    `weights` are the mixture weights (float64, on the stacked model's device) and `combine` the ensemble's rule
    (mixture or product). `capture` None captures where the model is on CUDA."""

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
    ):
        self.stacked = stacked
        self.weights = weights
        self.combine = combine
        cuda = stacked.embed.device.type == "cuda"
        self.capture = cuda if capture is None else capture
        if self.capture and not cuda:
            raise ValueError("capture=True needs the stacked model on a CUDA device")
        self.mixture_dtype = mixture_dtype or (torch.float32 if cuda else torch.float64)
        self._shapes: OrderedDict[tuple[int, int], _Shape] = OrderedDict()
        # torch.compile fuses the step's elementwise work (norms, rotary, the mixture) into fewer kernels before
        # it is captured: fewer kernels per replay, at a compilation per captured shape (static shapes)
        self.compiled = compile
        self._step = (
            torch.compile(self._step_eager, fullgraph=True, dynamic=False, backend=compile_backend)
            if compile
            else self._step_eager
        )

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (batch, capacity) shapes held now, least recently used first."""
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
        width = input_ids.shape[1]
        shape = self._shape(bucket(rows, BATCH_BUCKETS), width + max_new_tokens)
        first = self._prefill(shape, input_ids, attention_mask, rows)
        gens = [torch.Generator().manual_seed(seed) for _ in range(rows)] if temperature > 0 else []
        self._choose(shape, first, width, rows, temperature, gens)
        for step in range(1, max_new_tokens):
            self._replay(shape)
            if temperature > 0:
                self._choose(shape, shape.log_probs, width + step, rows, temperature, gens)
                done = self._ended(shape, width, width + step, rows, eos)
            elif step % CHECK_EVERY == 0:
                done = self._ended(shape, width, width + step, rows, eos)
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
        width = input_ids.shape[1]
        shape = self._shape(bucket(rows, BATCH_BUCKETS), width + steps)
        out = [self._prefill(shape, input_ids, attention_mask, rows)[:rows].clone()]
        for step in range(steps - 1):
            shape.tokens[:rows] = continuation[:, step : step + 1]
            shape.position.fill_(width + step)
            self._replay(shape)
            out.append(shape.log_probs[:rows].clone())
        return torch.stack(out, dim=1)

    def _shape(self, batch: int, needed: int) -> _Shape:
        """The captured shape for `batch` rows and `needed` positions, made (and captured) on first use."""
        steps = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
        capacity = max(needed, min(steps, self.stacked.context_length))
        key = (batch, capacity)
        if key in self._shapes:
            self._shapes.move_to_end(key)
            return self._shapes[key]
        while len(self._shapes) >= MAX_GRAPHS:
            self._shapes.popitem(last=False)
        self.stacked.reserve_positions(
            capacity
        )  # extend the rotary table now: a graph must never see it replaced
        shape = _Shape(self.stacked, batch, capacity, self.mixture_dtype)
        if self.capture:
            self._capture_graph(shape)
        self._shapes[key] = shape
        return shape

    def _step_eager(self, shape: _Shape) -> None:
        """One token for every row, all on the device: what the graph records."""
        visible = shape.key_mask & (shape.positions <= shape.position)
        logits = self.stacked.decode_step(shape.tokens, shape.position, shape.cache, visible)
        lp = torch.log_softmax(logits.to(self.mixture_dtype), dim=-1)
        combined = combine_log_probs(lp, self.weights, self.combine)
        shape.log_probs.copy_(combined)
        chosen = combined.argmax(-1, keepdim=True)
        shape.tokens.copy_(chosen)
        shape.position.add_(1)
        shape.sequence.index_copy_(1, shape.position, chosen)

    def _capture_graph(self, shape: _Shape) -> None:
        device = shape.tokens.device
        shape.key_mask.fill_(True)  # warm-up steps on zeros: finite, and overwritten by the prefill
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self._step(shape)
        torch.cuda.current_stream(device).wait_stream(stream)
        shape.position.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(shape)
        shape.graph = graph
        log.info("captured the decode step for batch %d, capacity %d", shape.batch, shape.capacity)

    def _replay(self, shape: _Shape) -> None:
        if shape.graph is not None:
            shape.graph.replay()
        else:
            self._step(shape)

    def _prefill(
        self, shape: _Shape, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: int
    ) -> torch.Tensor:
        """Run the prompts into the static cache (padding rows of end-of-text up to the shape's batch); set the
        key mask; return the combined log-probabilities (B, V) of the first new token."""
        extra = shape.batch - rows
        x = input_ids
        mask = attention_mask
        if extra:
            x = torch.cat([x, x.new_zeros(extra, x.shape[1])])
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(extra, mask.shape[1])])
        shape.cache.length, shape.cache.key_mask = 0, None
        logits, _ = self.stacked(x, attention_mask=mask, cache=shape.cache, logits_to_keep=1)
        shape.key_mask.fill_(True)
        if mask is not None:
            shape.key_mask[:, : x.shape[1]] = mask.to(torch.bool)
        shape.cache.key_mask = None
        lp = torch.log_softmax(logits[:, :, -1].to(self.mixture_dtype), dim=-1)
        return combine_log_probs(lp, self.weights, self.combine)

    def _choose(
        self,
        shape: _Shape,
        log_probs: torch.Tensor,
        position: int,
        rows: int,
        temperature: float,
        gens: list[torch.Generator],
    ) -> None:
        """Set the token at `position` of every row from `log_probs`: the greedy one, or (temperature > 0) one
        drawn on the host as `Ensemble.generate` draws it; then the step's inputs point at it."""
        if temperature > 0:
            probs = torch.softmax(log_probs[:rows] / temperature, dim=-1).float().cpu()
            drawn = [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, gens)]
            chosen = log_probs.argmax(-1, keepdim=True)
            chosen[:rows, 0] = torch.tensor(drawn, device=chosen.device)
        else:
            chosen = log_probs.argmax(-1, keepdim=True)
        shape.tokens.copy_(chosen)
        shape.position.fill_(position)
        shape.sequence[:, position] = chosen[:, 0]

    @staticmethod
    def _ended(shape: _Shape, width: int, last: int, rows: int, eos: int) -> bool:
        """Whether every real row has made an end-of-text among its new tokens (one host synchronisation)."""
        return bool((shape.sequence[:rows, width : last + 1] == eos).any(dim=1).all())
