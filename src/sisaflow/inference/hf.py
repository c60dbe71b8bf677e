"""The ensemble as a transformers model: transformers' `generate()` with its decoding options (greedy, sampling
with temperature / top-k / top-p / min-p, repetition penalties, beam search, several sequences per prompt, one's
own logits processors and stopping criteria), over the same batched runners as `Ensemble.generate`.

    ens = Ensemble.load(Workspace(root))
    model = EnsembleForCausalLM(ens)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=40, do_sample=True, top_p=0.9)

`input_ids` are the ensemble's tokenizer's ids; `model.encode(prompts)` gives a left-padded batch with its
attention mask, and `model.decode(out, width)` the new text of each row:

    batch = model.encode(["Question: who wrote it?", "Question: when?"])
    out = model.generate(**batch, max_new_tokens=40, num_beams=4)
    texts = model.decode(out, batch["input_ids"].shape[1])

What transformers sees as logits are the ensemble's combined log-probabilities (the mixture or product of the
constituents; `generate` reads them as float32), so its processors and sampling act on the ensemble's
distribution as they would on one model's. The KV cache is the runner's own (a `StackedCache`, the base's
cache over S times the rows, or one cache per constituent), opaque to transformers: `generate` is told not to
make one, the forward hands it back, and beam search reorders it through `_reorder_cache`. Like
`Ensemble.generate`, each call first checks that the loaded ensemble is still the one to serve
(`StaleEnsembleError` if a deletion request or a promotion changed it).

`model.hf_tokenizer()` gives the tokenizer as a transformers one (`ByteLevelTokenizer` for bytes), for
`pipeline("text-generation", model=model, tokenizer=...)` and `stop_strings`; importing this module registers
the config and model with transformers' Auto classes, which pipelines consult.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizer
from transformers.utils import ModelOutput

from sisaflow.inference.ensemble import Ensemble
from sisaflow.models.tokenizer import BaseTokenizer, ByteTokenizer, Gpt2Tokenizer, Tokenizer

EOS_TOKEN = "<|endoftext|>"


class ByteLevelTokenizer(PreTrainedTokenizer):
    """sisaflow's byte tokenizer (UTF-8 bytes 0..255, end-of-text 256) as a transformers tokenizer, for
    pipelines, `stop_strings` and evaluation harnesses. Text is always bytes, "<|endoftext|>" written in a text
    included (`split_special_tokens`), so its ids are `ByteTokenizer.encode`'s. Pads on the left, for
    generation."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs: Any) -> None:
        for name in ("eos_token", "pad_token"):
            kwargs.setdefault(name, EOS_TOKEN)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {**{chr(i): i for i in range(256)}, EOS_TOKEN: 256}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return 256 if token == EOS_TOKEN else ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        return EOS_TOKEN if index == 256 else chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Bytes back to text (invalid UTF-8 replaced, as `ByteTokenizer.decode`); end-of-text kept as written."""
        parts, run = [], bytearray()
        for t in tokens:
            if len(t) == 1:
                run.append(ord(t))
                continue
            parts += [run.decode("utf-8", errors="replace"), t]
            run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is fixed: nothing to write


def hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """The transformers tokenizer of an ensemble's tokenizer: `ByteLevelTokenizer` for bytes, the shipped GPT-2
    tokenizer, or the pretrained base's own (which may add the base's special tokens where sisaflow's encoding
    does not: pass `add_special_tokens=False`)."""
    if isinstance(tokenizer, ByteTokenizer):
        return ByteLevelTokenizer()
    if isinstance(tokenizer, Gpt2Tokenizer | BaseTokenizer):
        return tokenizer._tok
    raise TypeError(f"no transformers tokenizer for {type(tokenizer).__name__}")


class EnsembleConfig(PretrainedConfig):
    """What transformers' generation reads of a model's config: the vocabulary, end of text, the context."""

    model_type = "sisaflow-ensemble"

    def __init__(
        self,
        vocab_size: int = 257,
        eos_token_id: int = 256,
        max_position_embeddings: int = 512,
        num_constituents: int = 1,
        combine: str = "mixture",
        **kwargs: Any,
    ) -> None:
        pad_token_id = kwargs.pop("pad_token_id", eos_token_id)
        super().__init__(**kwargs)
        # set after the base's __init__, which in some transformers versions resets the special tokens
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.num_constituents = num_constituents
        self.combine = combine
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id


# the name `generate` hands the cache back under: `cache` since transformers 5.2x, `past_key_values` before
_CACHE_NAME = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


if _CACHE_NAME == "cache":

    @dataclass
    class EnsembleLMOutput(ModelOutput):
        """`logits`: the combined log-probabilities (B, T, V); `cache`: the runner's cache."""

        logits: torch.Tensor | None = None
        cache: Any = None

else:  # transformers before the rename

    @dataclass
    class EnsembleLMOutput(ModelOutput):  # type: ignore[no-redef]
        """`logits`: the combined log-probabilities (B, T, V); `past_key_values`: the runner's cache."""

        logits: torch.Tensor | None = None
        past_key_values: Any = None


_UNSUPPORTED = ("inputs_embeds", "labels", "output_attentions", "output_hidden_states")
"""What a transformers forward may be asked for that a mixture of constituents does not have."""


class EnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    """A loaded `Ensemble` behind transformers' `PreTrainedModel` and `GenerationMixin` interface. It holds the
    ensemble's modules (no copy of any weight) and is for inference only: its forward runs without gradients."""

    config_class = EnsembleConfig
    base_model_prefix = "ensemble"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, ensemble: Ensemble) -> None:
        config = EnsembleConfig(
            vocab_size=ensemble.tokenizer.vocab_size,
            eos_token_id=ensemble.tokenizer.eos_id,
            max_position_embeddings=ensemble.context_length,
            num_constituents=int(ensemble.weights.numel()),
            combine=ensemble.combine,
        )
        super().__init__(config)
        # not post_init(): it would initialise weights, and these are the trained constituents
        self.ensemble = ensemble
        self.eval()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the cache is the runner's own; transformers must not make a DynamicCache for it
        return False

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to initialise: the weights are the trained constituents'."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> EnsembleLMOutput:
        """The ensemble's combined log-probabilities as `.logits` and, with `use_cache`, the runner's cache
        (pass it back as `cache` with only the new tokens, and the mask over all of them)."""
        unsupported = [k for k in _UNSUPPORTED if kwargs.get(k) is not None and kwargs[k] is not False]
        if unsupported:
            raise ValueError(
                f"the ensemble's forward takes token ids and returns combined log-probabilities only; it has no "
                f"{', '.join(unsupported)}"
            )
        given = cache if cache is not None else past_key_values
        out = self.ensemble(
            input_ids,
            attention_mask=attention_mask,
            past_key_values=given,
            use_cache=bool(use_cache) or given is not None,
            logits_to_keep=logits_to_keep,
        )
        return EnsembleLMOutput(logits=out.logits, **{_CACHE_NAME: out.past_key_values})

    def prepare_inputs_for_generation(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        cache: Any = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The whole prompt first, then only the tokens the cache has not seen (one per step)."""
        given = cache if cache is not None else past_key_values
        if given is not None:
            seen = (given[0] if isinstance(given, list) else given).get_seq_length()
            input_ids = input_ids[:, seen:]
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }
        if given is not None:
            inputs["cache"] = given
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def _reorder_cache(self, cache: Any, beam_idx: torch.Tensor) -> Any:
        """Beam search: keep the cached rows `beam_idx` names, in that order."""
        return self.ensemble.select_cache_rows(cache, beam_idx)

    def encode(self, prompts: str | Sequence[str], max_new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` of a batch of prompts, left-padded with end-of-text as `generate`
        expects (`Ensemble.encode_prompts`: a prompt longer than the context keeps its end)."""
        rows = [prompts] if isinstance(prompts, str) else list(prompts)
        x, mask = self.ensemble.encode_prompts(rows, max_new_tokens)
        return {"input_ids": x, "attention_mask": torch.ones_like(x) if mask is None else mask}

    def decode(self, sequences: torch.Tensor, prompt_width: int) -> list[str]:
        """The text `generate` added to each row of a batch whose prompts were `prompt_width` tokens wide, up to
        its first end-of-text (the padding of finished rows)."""
        eos = self.ensemble.tokenizer.eos_id
        texts = []
        for row in sequences[:, prompt_width:].tolist():
            texts.append(self.ensemble.tokenizer.decode(row[: row.index(eos)] if eos in row else row))
        return texts

    def hf_tokenizer(self) -> Any:
        """The ensemble's tokenizer as a transformers tokenizer (`hf_tokenizer`), for pipelines and
        `stop_strings`."""
        return hf_tokenizer(self.ensemble.tokenizer)

    def generate(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """transformers' `generate`, after checking that this ensemble is still the one to serve."""
        asked = [k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)]
        if asked:
            raise ValueError(f"a mixture of constituents has no {', '.join(asked)} to return")
        self.ensemble.check_current()
        return super().generate(*args, **kwargs)


def _register() -> None:
    """Make the Auto classes (and so pipelines) know the ensemble's config and model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(EnsembleConfig.model_type, EnsembleConfig)
        AutoModelForCausalLM.register(EnsembleConfig, EnsembleForCausalLM)
    except ValueError:  # registered already (the module imported again)
        pass


_register()
