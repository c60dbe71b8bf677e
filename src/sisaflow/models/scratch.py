"""The constituent model: a small Llama-style causal LM built from params (transformers)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sisaflow.core.config import ModelParams


def model_config(params: ModelParams, vocab_size: int, eos_id: int) -> LlamaConfig:
    """The transformers config of a constituent."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.layers,
        num_attention_heads=params.heads,
        num_key_value_heads=params.heads,
        max_position_embeddings=params.context_length,
        tie_word_embeddings=params.tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_dropout=0.0,
    )


def build_model(params: ModelParams, vocab_size: int, eos_id: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised constituent; the initial weights depend only on `seed`."""
    config = model_config(params, vocab_size, eos_id)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
