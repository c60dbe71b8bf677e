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


# SmolLM2's special tokens; its GGUF names <|im_start|> the beginning and <|im_end|> the end of text
GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def save_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """The tiny base's Llama shape as a GGUF file (float32 tensors, GGUF names) with a byte-level BPE tokenizer
    (two merges) and SmolLM2's special tokens at the end of its vocabulary: begin <|im_start|>, end and padding
    <|im_end|>. Needs the `gguf` package (the dev extra); transformers de-quantises it like any GGUF base."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    merges = ["h e", "l l"]
    tokens = (
        sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges] + GGUF_SPECIALS
    )
    first_special = len(tokens) - len(GGUF_SPECIALS)
    hidden, layers, heads, kv_heads, ff = 32, 2, 4, 2, 64
    kv = hidden // heads * kv_heads
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * first_special + [3] * len(GGUF_SPECIALS))  # normal, then control tokens
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    rng = np.random.default_rng(seed)
    shapes = {"token_embd": (len(tokens), hidden), "output": (len(tokens), hidden)}
    for i in range(layers):
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ff, hidden)),
            ("ffn_up", (ff, hidden)),
            ("ffn_down", (hidden, ff)),
        ):
            shapes[f"blk.{i}.{name}"] = shape
    for name, shape in shapes.items():
        w.add_tensor(
            f"{name}.weight", (rng.standard_normal(shape) * 1.5 / shape[1] ** 0.5).astype(np.float32)
        )
    for name in [f"blk.{i}.{n}" for i in range(layers) for n in ("attn_norm", "ffn_norm")] + ["output_norm"]:
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
