"""A tiny random pretrained base for LoRA tests, saved in transformers format: byte-level tokenizer, Llama with
hidden 32, 2 layers and grouped key/value heads (so the batched path meets GQA), weights large enough that the
output depends on the context. Built from nothing, offline, in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"


def save_tokenizer(directory: Path) -> None:
    """A byte-level BPE without merges (256 byte tokens + end-of-text), saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(str(directory))


def save_tiny_base(directory: Path, seed: int = 0, scale: float = 1.5) -> Path:
    """Write a random Llama base and its tokenizer to `directory`; return it."""
    return save_random_base(
        directory,
        seed=seed,
        scale=scale,
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def save_random_base(directory: Path, seed: int = 0, scale: float = 1.5, **shape) -> Path:
    """A random Llama of the given config fields (vocab_size at least 257) with the byte-level tokenizer, saved in
    transformers format to `directory` (bench/gpu.py builds one of the SmolLM2-135M shape); return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(bos_token_id=256, eos_token_id=256, pad_token_id=256, **shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in model.parameters():
                if w.dim() == 2:
                    w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)
    model.save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory
