"""The KV cache of `sisaflow.inference.stacked.StackedLlama`: every constituent's keys and values, preallocated."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StackedCache:
    """Keys and values of every constituent and layer, preallocated and filled in place.

    `keys[l]` and `values[l]` have shape (S, B, heads, capacity, head_dim); positions `0..length-1` are filled.
    A forward that is given the cache writes into it and advances `length` (like transformers' DynamicCache), and
    doubles the capacity when a step would overflow it. `key_mask` (B, capacity), True for real tokens, is kept
    only once a padded attention_mask has been seen; None means every position is real.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    key_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[3])

    def get_seq_length(self) -> int:
        """The number of cached positions (the name transformers' caches use)."""
        return self.length

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions, growing at least twofold so appends stay amortised O(1)."""
        if needed <= self.capacity:
            return
        extra = max(needed, 2 * self.capacity) - self.capacity

        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_empty((*t.shape[:3], extra, t.shape[4]))], dim=3)

        self.keys = [grow(k) for k in self.keys]
        self.values = [grow(v) for v in self.values]
        if self.key_mask is not None:
            self.key_mask = torch.cat(
                [self.key_mask, self.key_mask.new_ones((self.key_mask.shape[0], extra))], 1
            )

    def select_models(self, selected: torch.Tensor) -> StackedCache:
        """A new cache holding, for each row b, only the constituents `selected[b]` (B, k), in slot order:
        what `StackedLlama.routed(selected)` reads and extends."""
        slots = selected.T.to(self.keys[0].device)  # (k, B)
        rows = torch.arange(slots.shape[1], device=slots.device)[None, :]
        return StackedCache(
            keys=[k[slots, rows] for k in self.keys],
            values=[v[slots, rows] for v in self.values],
            length=self.length,
            key_mask=None if self.key_mask is None else self.key_mask.clone(),
        )

    def select_rows(self, rows: torch.Tensor) -> StackedCache:
        """Keep the rows `rows` names, in that order (beam search reorders its beams so), in place. Only the
        filled positions are copied: beam search does this every step, and the capacity is the whole context."""
        rows = rows.to(self.keys[0].device)

        def select(t: torch.Tensor) -> torch.Tensor:
            chosen = t[:, :, :, : self.length].index_select(1, rows)
            out = t if rows.numel() == t.shape[1] else t.new_empty((t.shape[0], rows.numel(), *t.shape[2:]))
            out[:, :, :, : self.length] = chosen  # later positions are never read before they are written
            return out

        self.keys = [select(k) for k in self.keys]
        self.values = [select(v) for v in self.values]
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, rows)
        return self
