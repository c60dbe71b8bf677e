"""Tokenizers that do not depend on the corpus: the fixed GPT-2 vocabulary shipped with sisaflow, bytes, or the
pretrained base model's own (LoRA constituents).

A tokenizer trained on the corpus would remember deleted records (rare words become tokens), and it is shared
by every constituent, so it must never see deletable data.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Protocol

GPT2_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Gpt2Tokenizer:
    """GPT-2 byte-level BPE (50,257 tokens), loaded offline from the shipped vocab.json and merges.txt."""

    def __init__(self) -> None:
        from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]

        self._tok = GPT2TokenizerFast.from_pretrained(str(GPT2_DIR))
        self.eos_id = self._tok.convert_tokens_to_ids("<|endoftext|>")
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, and 256 as end of text."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BaseTokenizer:
    """The pretrained base's own tokenizer (transformers, offline), as text -> ids without special tokens.

    Records are encoded as plain text plus end-of-text, exactly like the fixed tokenizers, so training, scoring
    and generation see the same ids whatever the base's template conventions are."""

    def __init__(self, base: str) -> None:
        from sisaflow.core.errors import ConfigError
        from sisaflow.models.pretrained import load_base_tokenizer

        self._tok = load_base_tokenizer(base)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ConfigError(
                f"params: model.base = {base!r}: its tokenizer has no end-of-text token (eos_token); sisaflow "
                "ends every record with one"
            )
        self.eos_id = int(eos)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the base's special tokens (no BOS)."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return self._tok.decode(ids, skip_special_tokens=True)


@lru_cache(maxsize=4)
def load_tokenizer(name: str, base: str | None = None) -> Tokenizer:
    """The tokenizer named by model.tokenizer in params; `base` (model.base) is needed for `base`."""
    if name == "gpt2":
        return Gpt2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "base":
        if base is None:
            raise ValueError("tokenizer 'base' needs the base model's path (model.base)")
        return BaseTokenizer(base)
    raise ValueError(f"unknown tokenizer {name!r}; choose gpt2, byte or base")
