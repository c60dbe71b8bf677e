"""Batched ensemble inference: all S constituents (one Llama architecture) evaluated in one computation per step.

`StackedLlama.from_models` copies the constituents' weights into tensors with a leading constituent dim S and
runs the Llama forward in plain torch: batched matmuls (`torch.bmm`) over S, and attention with S folded into the
batch (`scaled_dot_product_attention` on (S*B, heads, T, d)). The numerics follow transformers' Llama (RMSNorm in
float32, default RoPE, SiLU MLP, head_dim**-0.5 scaling). Query/key/value and gate/up weights are concatenated so
a layer costs four matmuls whatever S is; on small models the per-step cost is kernel launches, not FLOPs.

A weight may also be shared by all constituents (leading dim 1: a pretrained base under LoRA adapters, see
`sisaflow.inference.lora_runners.stacked_lora`); it is then one matmul over all S x rows. `deltas` add low-rank terms per
constituent to a fused projection (LoRA: x A_s^T (scale B_s)^T, one bmm and one baddbmm per projection).

Positions follow a transformers forward without `position_ids`: past length + 0..T-1, whatever the padding.
RoPE depends only on relative positions, so a left-padded row gives the same outputs for its real tokens as the
unpadded prompt (up to float rounding). Outputs at padded positions are meaningless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from sisaflow.inference.stacked_cache import StackedCache

# config fields that decide the computation; every constituent must agree on them
_ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "rope_parameters",
)


class StackedLlama(nn.Module):
    """S transformers Llama causal LMs of one config, as one module whose forward returns (S, B, T, V) logits.

    Build it with `from_models`; the weights are copies, so later changes to the models are not seen, unless
    `share_with` then makes the models' weights views of the stacked ones (one copy in memory, not two).
    Inference only (runs under no_grad). Limits: default RoPE, SiLU, no biases; left padding only through
    `attention_mask` (see `forward`). Grouped key/value heads are repeated for attention as transformers does.
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    batched = True
    """One computation for all constituents (what `Ensemble.batched` reports)."""

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        *,
        heads: int,
        head_dim: int,
        rms_norm_eps: float,
        context_length: int,
        inv_freq: torch.Tensor,
        attention_scaling: float,
        kv_heads: int | None = None,
        num_models: int | None = None,
        deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"{heads} attention heads cannot share {self.kv_heads} key/value heads")
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.context_length = context_length
        self.attention_scaling = attention_scaling
        self.tied = "lm_head" not in weights
        self.embed = nn.Parameter(weights["embed"], requires_grad=False)  # (S, V, H)
        self.lm_head = nn.Parameter(weights["lm_head"], requires_grad=False) if not self.tied else None
        self.qkv = nn.Parameter(weights["qkv"], requires_grad=False)  # (L, S, 3*heads*d, H)
        self.o = nn.Parameter(weights["o"], requires_grad=False)  # (L, S, H, heads*d)
        self.gate_up = nn.Parameter(weights["gate_up"], requires_grad=False)  # (L, S, 2*I, H)
        self.down = nn.Parameter(weights["down"], requires_grad=False)  # (L, S, H, I)
        self.input_norm = nn.Parameter(weights["input_norm"], requires_grad=False)  # (L, S, 1, H)
        self.post_norm = nn.Parameter(weights["post_norm"], requires_grad=False)  # (L, S, 1, H)
        self.final_norm = nn.Parameter(weights["final_norm"], requires_grad=False)  # (S, 1, H)
        self._num_models = num_models or int(self.embed.shape[0])
        self.routed_rows = 0
        """> 0 in a view made by `routed`: the batch size, each row with its own constituents' deltas."""
        # low-rank terms per fused projection: A^T (L, S, in, R) and B^T (L, S, R, out)
        self.deltas = nn.ParameterDict(
            {
                f"{name}_{factor}": nn.Parameter(t, requires_grad=False)
                for name, pair in (deltas or {}).items()
                for factor, t in zip("ab", pair, strict=True)
            }
        )
        # kept in float32 (not a buffer, so .to(dtype) cannot round it); used only to extend the table
        self._inv_freq = inv_freq.detach().float().clone()
        cos, sin = self._rope_table(max(context_length, 1), self.embed.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def num_models(self) -> int:
        return self._num_models

    @property
    def num_layers(self) -> int:
        return int(self.qkv.shape[0])

    @staticmethod
    def refusal(models: Sequence[torch.nn.Module]) -> str | None:
        """Why `from_models` would refuse `models`, or None when it takes them; reads the models, changes nothing."""
        if not models:
            return "StackedLlama needs at least one model"
        for i, m in enumerate(models):
            if not isinstance(m, LlamaForCausalLM):
                return f"model {i} is a {type(m).__name__}; StackedLlama stacks LlamaForCausalLM only"
        cfg = models[0].config
        arch: dict[str, Any] = {k: getattr(cfg, k, None) for k in _ARCH_KEYS}
        for i, m in enumerate(models[1:], start=1):
            for k in _ARCH_KEYS:
                if getattr(m.config, k, None) != arch[k]:
                    return (
                        f"model {i} has config {k} = {getattr(m.config, k, None)!r} but model 0 has {arch[k]!r}; "
                        "every stacked model must share one config"
                    )
        unsupported = _unsupported(arch)
        if unsupported:
            return "StackedLlama does not support " + "; ".join(unsupported)
        first = next(models[0].parameters())
        for i, m in enumerate(models):
            for name, p in m.named_parameters():
                if p.dtype != first.dtype or p.device != first.device:
                    return (
                        f"model {i} parameter {name} is {p.dtype} on {p.device}, model 0 is {first.dtype} on "
                        f"{first.device}; move every model to one dtype and device first"
                    )
        return None

    @classmethod
    def from_models(
        cls,
        models: list[LlamaForCausalLM],
        context_length: int | None = None,
        num_models: int | None = None,
        deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> StackedLlama:
        """Stack the weights of `models`; ValueError if they differ in config, dtype or device, or use a feature
        this implementation lacks. Tied embeddings are stacked once and serve as the output head.

        One model with `num_models` S > 1 shares its weights among S constituents that differ by `deltas`.
        `context_length` (default: the config's max_position_embeddings) sizes a fresh cache."""
        refusal = cls.refusal(models)
        if refusal:
            raise ValueError(refusal)
        cfg = models[0].config
        arch: dict[str, Any] = {k: getattr(cfg, k, None) for k in _ARCH_KEYS}

        layers = [[m.model.layers[j] for m in models] for j in range(arch["num_hidden_layers"])]

        def per_layer(get) -> torch.Tensor:
            return torch.stack([torch.stack([get(layer).detach() for layer in row]) for row in layers])

        weights = {
            "embed": torch.stack([m.model.embed_tokens.weight.detach() for m in models]),
            "qkv": per_layer(
                lambda d: torch.cat(
                    [d.self_attn.q_proj.weight, d.self_attn.k_proj.weight, d.self_attn.v_proj.weight]
                )
            ),
            "o": per_layer(lambda d: d.self_attn.o_proj.weight),
            "gate_up": per_layer(lambda d: torch.cat([d.mlp.gate_proj.weight, d.mlp.up_proj.weight])),
            "down": per_layer(lambda d: d.mlp.down_proj.weight),
            "input_norm": per_layer(lambda d: d.input_layernorm.weight[None]),
            "post_norm": per_layer(lambda d: d.post_attention_layernorm.weight[None]),
            "final_norm": torch.stack([m.model.norm.weight.detach()[None] for m in models]),
        }
        # tie by identity, not by config: correct even if a loader broke (or made) the tie
        if not all(m.lm_head.weight is m.model.embed_tokens.weight for m in models):
            weights["lm_head"] = torch.stack([m.lm_head.weight.detach() for m in models])
        rotary = models[0].model.rotary_emb
        return cls(
            weights,
            heads=arch["num_attention_heads"],
            head_dim=arch["head_dim"] or arch["hidden_size"] // arch["num_attention_heads"],
            rms_norm_eps=arch["rms_norm_eps"],
            context_length=context_length or arch["max_position_embeddings"],
            inv_freq=rotary.inv_freq,
            attention_scaling=float(rotary.attention_scaling),
            kv_heads=arch["num_key_value_heads"],
            num_models=num_models,
            deltas=deltas,
        )

    @torch.no_grad()
    def share_with(self, models: list[LlamaForCausalLM]) -> None:
        """Point each model's weights at its slice of the stacked weights (the models given to `from_models`,
        in order), freeing the models' own copies: an ensemble then holds its weights once, not twice. The
        models and this module see the same tensors from then on; moving or casting one of them alone copies
        again, so move and cast the models before stacking. ValueError if a model does not fit its slice."""
        if self.deltas or len(models) != self.num_models or self.embed.shape[0] != self.num_models:
            raise ValueError("share_with takes the models this module stacked, one per constituent")
        heads, kv, d = self.heads, self.kv_heads, self.head_dim
        for i, m in enumerate(models):
            views = {"model.embed_tokens.weight": self.embed[i], "model.norm.weight": self.final_norm[i, 0]}
            if self.lm_head is not None:
                views["lm_head.weight"] = self.lm_head[i]
            for j in range(self.num_layers):
                at = f"model.layers.{j}."
                q, k, v = self.qkv[j, i].split([heads * d, kv * d, kv * d])
                gate, up = self.gate_up[j, i].chunk(2)
                views |= {
                    at + "self_attn.q_proj.weight": q,
                    at + "self_attn.k_proj.weight": k,
                    at + "self_attn.v_proj.weight": v,
                    at + "self_attn.o_proj.weight": self.o[j, i],
                    at + "mlp.gate_proj.weight": gate,
                    at + "mlp.up_proj.weight": up,
                    at + "mlp.down_proj.weight": self.down[j, i],
                    at + "input_layernorm.weight": self.input_norm[j, i, 0],
                    at + "post_attention_layernorm.weight": self.post_norm[j, i, 0],
                }
            params = dict(m.named_parameters())  # a tied head is listed once, as the embedding
            missing = sorted(set(params) - set(views))
            if missing:
                raise ValueError(f"model {i} has weights the stack does not hold: {', '.join(missing[:3])}")
            for name, p in params.items():
                view = views[name]
                if view.shape != p.shape or view.dtype != p.dtype:
                    raise ValueError(
                        f"model {i} {name} is {tuple(p.shape)} {p.dtype}; its slice {tuple(view.shape)}"
                    )
                if not torch.equal(view, p):
                    raise ValueError(f"model {i} {name} changed since it was stacked")
                p.data = view

    def routing_refusal(self) -> str | None:
        """Why `routed` cannot run only each row's chosen constituents, or None: every weight but the low-rank
        deltas must be shared (LoRA over one base); stacked from-scratch models differ in every weight."""
        shared = [self.embed, self.qkv, self.o, self.gate_up, self.down, self.input_norm, self.post_norm]
        shared.append(self.final_norm)
        if self.lm_head is not None:
            shared.append(self.lm_head)
        leading = [t.shape[0] if t.dim() == 3 else t.shape[1] for t in shared]
        if any(n != 1 for n in leading) or not self.deltas:
            return "only LoRA constituents over one shared base are routed per row"
        if self.routed_rows:
            return "this is a routed view already"
        return None

    def routed(self, selected: torch.Tensor) -> StackedLlama:
        """A view that computes, for each row b of a batch, only the k constituents `selected[b]` (B, k): k
        slots sharing the base's weights, each (slot, row) with its constituent's deltas (copied once: rank x
        width numbers per projection). Logits are (k, B, T, V) in slot order; its cache is the full cache's
        `select_models(selected)`. ValueError with `routing_refusal`'s reason when it cannot."""
        refusal = self.routing_refusal()
        if refusal:
            raise ValueError(refusal)
        index = selected.T.reshape(-1).to(self.embed.device)  # (slot, row) in slot-major order
        weights = {
            name: getattr(self, name).data
            for name in ("embed", "qkv", "o", "gate_up", "down", "input_norm", "post_norm", "final_norm")
        }
        if self.lm_head is not None:
            weights["lm_head"] = self.lm_head.data
        names = {key.rsplit("_", 1)[0] for key in self.deltas}
        deltas = {
            n: (self.deltas[n + "_a"].index_select(1, index), self.deltas[n + "_b"].index_select(1, index))
            for n in names
        }
        view = StackedLlama(
            weights,
            heads=self.heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            context_length=self.context_length,
            inv_freq=self._inv_freq,
            attention_scaling=self.attention_scaling,
            kv_heads=self.kv_heads,
            num_models=int(selected.shape[1]),
            deltas=deltas,
        )
        view.routed_rows = int(selected.shape[0])
        return view

    def new_cache(self, batch_size: int, capacity: int | None = None) -> StackedCache:
        """An empty cache for `batch_size` rows; `capacity` defaults to the context length."""
        shape = (self.num_models, batch_size, self.kv_heads, capacity or self.context_length, self.head_dim)
        like = self.embed
        # uninitialised: a position is read only after it is written (zeroing the whole context's worth cost a
        # third of a short batched generation on CPU)
        return StackedCache(
            keys=[like.new_empty(shape) for _ in range(self.num_layers)],
            values=[like.new_empty(shape) for _ in range(self.num_layers)],
        )

    def select_cache_rows(self, cache: StackedCache, rows: torch.Tensor) -> StackedCache:
        """The cache of the rows `rows` names, in that order (beam search)."""
        return cache.select_rows(rows)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: StackedCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, StackedCache | None]:
        """Logits (S, B, T, V) of every constituent for `input_ids` (B, T), and the cache (None unless
        `use_cache` or a cache was given; a given cache is updated in place and returned).

        `attention_mask` follows transformers: (B, past + T), 1 for real tokens, covering the cached positions
        too; None means all real (or, after a padded prefill, that the new tokens are real). Padding may sit
        anywhere, but only left padding gives meaningful generation. `logits_to_keep` > 0 computes the head for
        the last that many positions only.
        """
        batch, steps = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is None and use_cache:
            cache = self.new_cache(batch, max(self.context_length, steps))
        if cache is not None:
            if cache.batch_size != batch:
                raise ValueError(f"input batch {batch} does not match the cache's batch {cache.batch_size}")
            cache.reserve(past + steps)
        total = past + steps
        key_mask = self._key_mask(attention_mask, cache, batch, past, steps, input_ids.device)
        cos, sin = self._rope(past, steps)

        n, heads, kv, d = self.num_models, self.heads, self.kv_heads, self.head_dim
        deltas = dict(self.deltas)  # one lookup per call, not per layer
        x = self.embed[:, input_ids].reshape(self.embed.shape[0], batch * steps, -1).expand(n, -1, -1)
        for layer in range(self.num_layers):
            h = self._rms_norm(x, self.input_norm[layer])
            qkv = self._project(h, self.qkv, "qkv", layer, deltas)
            qkv = qkv.view(n, batch, steps, heads + 2 * kv, d).transpose(2, 3)  # (S, B, heads + 2 kv, T, d)
            q, k, v = qkv[:, :, :heads], qkv[:, :, heads : heads + kv], qkv[:, :, heads + kv :]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if cache is not None:
                cache.keys[layer][:, :, :, past:total] = k
                cache.values[layer][:, :, :, past:total] = v
                k = cache.keys[layer][:, :, :, :total]
                v = cache.values[layer][:, :, :, :total]
            attn = self._attention(q, k, v, key_mask, past)  # (S*B, heads, T, d)
            attn = attn.view(n, batch, heads, steps, d).transpose(2, 3).reshape(n, batch * steps, -1)
            x = x + self._project(attn, self.o, "o", layer, deltas)
            h = self._rms_norm(x, self.post_norm[layer])
            gate, up = self._project(h, self.gate_up, "gate_up", layer, deltas).chunk(2, dim=-1)
            x = x + self._project(F.silu(gate) * up, self.down, "down", layer, deltas)
        x = self._rms_norm(x, self.final_norm).view(n, batch, steps, -1)
        if 0 < logits_to_keep < steps:
            x = x[:, :, -logits_to_keep:]
        kept = x.shape[2]
        head = self.embed if self.lm_head is None else self.lm_head
        x = x.reshape(n, batch * kept, -1)
        logits = F.linear(x, head[0]) if head.shape[0] == 1 else torch.bmm(x, head.transpose(1, 2))
        logits = logits.view(n, batch, kept, -1)
        if cache is not None:
            cache.length = total
        return logits, cache

    def _project(
        self, h: torch.Tensor, weights: torch.Tensor, name: str, layer: int, deltas: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """h (S, N, in) through layer `layer` of a stacked (S) or shared (1) projection, plus its deltas (in a
        routed view, each row's own: N is rows x tokens, row-major)."""
        w = weights[layer]
        y = F.linear(h, w[0]) if w.shape[0] == 1 else torch.bmm(h, w.transpose(1, 2))
        if name + "_a" in deltas:
            a, b = deltas[name + "_a"][layer], deltas[name + "_b"][layer]
            if self.routed_rows:
                n, rows = h.shape[0], self.routed_rows
                low = torch.bmm(h.reshape(n * rows, -1, h.shape[-1]), a)  # (slots x rows, tokens, rank)
                return y + torch.bmm(low, b).view(y.shape)
            y = torch.baddbmm(y, torch.bmm(h, a), b)
        return y

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # as transformers' LlamaRMSNorm: statistics in float32, weight applied in the input dtype
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.rms_norm_eps)
        return weight * x32.to(dtype)

    def _rope_table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # the same operations as LlamaRotaryEmbedding.forward, for positions 0..length-1
        positions = torch.arange(length, device=device).float()
        freqs = positions[:, None] * self._inv_freq.to(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed.dtype
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def reserve_positions(self, length: int) -> None:
        """Extend the rotary table to `length` positions now (a captured graph must never see it replaced)."""
        self._rope(0, length)

    def _rope(self, past: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        if past + steps > self.rope_cos.shape[0]:
            self.rope_cos, self.rope_sin = self._rope_table(
                max(past + steps, 2 * self.rope_cos.shape[0]), self.rope_cos.device
            )
        return self.rope_cos[past : past + steps], self.rope_sin[past : past + steps]

    def _key_mask(
        self,
        attention_mask: torch.Tensor | None,
        cache: StackedCache | None,
        batch: int,
        past: int,
        steps: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Which key positions 0..past+steps-1 are real tokens, (B, past+steps) bool; None when all are."""
        total = past + steps
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new tokens) "
                f"= ({batch}, {total})"
            )
        known = cache.key_mask if cache is not None else None
        if attention_mask is None:
            # positions past the last mask given are True from allocation: new tokens are real
            return None if known is None else known[:, :total]
        mask = attention_mask.to(device=device, dtype=torch.bool)
        if known is None and bool(
            mask.all()
        ):  # one host sync per masked call; lets SDPA use its causal kernel
            return None
        if cache is not None:
            if cache.key_mask is None:
                cache.key_mask = torch.ones(batch, cache.capacity, dtype=torch.bool, device=device)
            cache.key_mask[:, :total] = mask
        return mask

    @torch.no_grad()
    def static_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: StackedCache,
        visible: torch.Tensor,
        every_position: bool = False,
    ) -> torch.Tensor:
        """Logits (S, B, V) at the last of `tokens` (B, T) (with `every_position`, (S, B, T, V) at each of them),
        every shape fixed and the positions a device tensor: the prefill and the decode step
        `sisaflow.inference.graphed` captures as CUDA graphs and replays.

        `tokens` sit at `positions` (a (T,) long tensor); their keys and values are written there into `cache` in
        place (its `length` is neither read nor advanced: the caller keeps the positions), and query t of row b
        attends to the cached positions `visible[b, t]` marks ((B, T, capacity), its own position included).
        The numbers are `forward`'s for the same tokens, except that attention runs over the whole capacity with
        the rest masked (sums of other lengths: float rounding)."""
        batch, steps = tokens.shape
        n, heads, kv, d = self.num_models, self.heads, self.kv_heads, self.head_dim
        group, capacity = heads // kv, cache.capacity
        cos, sin = self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)
        # the additive mask SDPA would make of a boolean one in every layer, made once per step; its query rows
        # repeated for the query heads that share a key/value head (see below)
        blocked = torch.zeros(visible.shape, dtype=self.embed.dtype, device=visible.device)
        blocked = blocked.masked_fill(~visible, float("-inf"))
        mask = (
            blocked[None, :, None, None]
            .expand(n, batch, 1, group, steps, capacity)
            .reshape(n * batch, 1, group * steps, capacity)
        )
        deltas = dict(self.deltas.items())  # torch.compile reads dict(ParameterDict) as (key, value) pairs
        x = self.embed[:, tokens].reshape(self.embed.shape[0], batch * steps, -1).expand(n, -1, -1)
        for layer in range(self.num_layers):
            h = self._rms_norm(x, self.input_norm[layer])
            qkv = self._project(h, self.qkv, "qkv", layer, deltas)
            qkv = qkv.view(n, batch, steps, heads + 2 * kv, d).transpose(2, 3)  # (S, B, heads + 2 kv, T, d)
            qk = qkv[:, :, : heads + kv]  # rotated together: the same numbers as one by one, half the kernels
            qk = qk * cos + _rotate_half(qk) * sin
            q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv :]
            cache.keys[layer].index_copy_(3, positions, k)
            cache.values[layer].index_copy_(3, positions, v)
            # the query heads that share a key/value head become more query rows of that head, so grouped heads
            # attend without repeating the cache (transformers' repeat_kv copies it: 2.3 GB a decode step for 8
            # adapters over SmolLM2 at batch 16, eight times the base's weights)
            q = q.reshape(n * batch, kv, group * steps, d)
            keys = cache.keys[layer].view(n * batch, kv, capacity, d)
            values = cache.values[layer].view(n * batch, kv, capacity, d)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5)
            attn = attn.view(n, batch, heads, steps, d).transpose(2, 3).reshape(n, batch * steps, heads * d)
            x = x + self._project(attn, self.o, "o", layer, deltas)
            h = self._rms_norm(x, self.post_norm[layer])
            gate, up = self._project(h, self.gate_up, "gate_up", layer, deltas).chunk(2, dim=-1)
            x = x + self._project(F.silu(gate) * up, self.down, "down", layer, deltas)
        x = x.view(n, batch, steps, -1)
        x = x.reshape(n, batch * steps, -1) if every_position else x[:, :, -1]
        x = self._rms_norm(x, self.final_norm)
        head = self.embed if self.lm_head is None else self.lm_head
        logits = F.linear(x, head[0]) if head.shape[0] == 1 else torch.bmm(x, head.transpose(1, 2))
        return logits.view(n, batch, steps, -1) if every_position else logits

    def _fold(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S, B, heads, T, d) queries and (S, B, kv, total, d) keys and values with S folded into the batch, the
        key/value heads repeated to the query heads as transformers' repeat_kv does."""
        n, batch, heads, steps, d = q.shape
        kv, total = k.shape[2], k.shape[3]
        q = q.reshape(n * batch, heads, steps, d)
        k, v = k.reshape(n * batch, kv, total, d), v.reshape(n * batch, kv, total, d)
        if kv != heads:  # a list, not a generator: torch.compile (the graph decoder's option) traces it
            k, v = [
                t[:, :, None].expand(n * batch, kv, heads // kv, total, d).reshape(n * batch, heads, total, d)
                for t in (k, v)
            ]
        return q, k, v

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, past: int
    ) -> torch.Tensor:
        n, batch, heads, steps, d = q.shape
        total = k.shape[3]
        q, k, v = self._fold(q, k, v)
        scale = self.head_dim**-0.5
        if key_mask is None and steps == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if key_mask is None and past == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        query_pos = torch.arange(past, total, device=q.device)[:, None]
        key_pos = torch.arange(total, device=q.device)[None, :]
        mask = key_pos <= query_pos  # (T, total)
        if key_mask is not None:
            # a padded query sees no real key; letting it see itself keeps its (unused) output finite
            mask = (mask & key_mask[:, None, :]) | (key_pos == query_pos)  # (B, T, total)
            mask = mask[None, :, None].expand(n, batch, 1, steps, total).reshape(n * batch, 1, steps, total)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _unsupported(arch: dict[str, Any]) -> list[str]:
    """The features of a Llama config this implementation lacks."""
    problems = []
    kv = arch["num_key_value_heads"] or arch["num_attention_heads"]
    if arch["num_attention_heads"] % kv:
        problems.append(f"{arch['num_attention_heads']} heads over {kv} key/value heads")
    if arch["hidden_act"] != "silu":
        problems.append(f"hidden_act {arch['hidden_act']!r} (only silu)")
    if arch["attention_bias"] or arch["mlp_bias"]:
        problems.append("attention or MLP biases")
    rope = arch["rope_parameters"] or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r} (only default)")
    return problems


def stacked_log_probs(
    models: list[LlamaForCausalLM], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Float64 next-token log-probabilities (S, B, T, V) of every model, in one batched forward.

    Copies the weights on every call: for repeated use, build a `StackedLlama` once.
    """
    logits, _ = StackedLlama.from_models(models)(input_ids, attention_mask)
    return torch.log_softmax(logits.double(), dim=-1)
