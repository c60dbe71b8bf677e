"""The runner interface: each batched runner says what it cannot take before anything is built, and a refusal
leaves the base model as it was (no half-adapted base to reload)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sisaflow.core.config import LoraParams
from sisaflow.inference.lora_runners import BatchedLora, batched_lora_refusal, stacked_lora_refusal
from sisaflow.inference.runners import ModelLoop, Runner, model_runner
from sisaflow.inference.stacked import StackedLlama
from sisaflow.models.pretrained import load_base_model
from tests.unit.inference.test_stacked import _models
from tests.unit.models.test_lora import _random_adapters, base_dir  # noqa: F401  (fixture)


class Wrapped(nn.Module):
    """A linear layer behind another module type: what no batched LoRA runner may replace."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _layout(model: nn.Module) -> dict[str, tuple[type, int]]:
    return {
        name: (type(m), sum(p.data_ptr() for p in m.parameters(recurse=False)))
        for name, m in model.named_modules()
    }


def test_each_lora_runner_states_what_it_refuses_and_a_refusal_changes_nothing(base_dir):  # noqa: F811
    lp = LoraParams(target_modules=["q_proj", "v_proj"])
    adapters = _random_adapters(base_dir, lp, 2)
    base = load_base_model(str(base_dir))
    assert stacked_lora_refusal(base, adapters) is None and batched_lora_refusal(base, adapters) is None

    on_head = _random_adapters(base_dir, LoraParams(target_modules=["q_proj", "lm_head"]), 2)
    assert "lm_head is not a linear layer of a Llama decoder layer" in stacked_lora_refusal(base, on_head)
    assert batched_lora_refusal(base, on_head) is None

    # the last adapted layer is no nn.Linear: BatchedLora must refuse before it replaces the layers before it
    last = base.model.layers[-1].self_attn
    last.v_proj = Wrapped(last.v_proj)
    before = _layout(base)
    refusal = batched_lora_refusal(base, adapters)
    assert refusal is not None and "v_proj is a Wrapped" in refusal
    with pytest.raises(ValueError) as exc:
        BatchedLora(base, adapters, lp.alpha / lp.r)
    assert str(exc.value) == refusal
    assert _layout(base) == before  # not one layer replaced
    assert isinstance(base.model.layers[0].self_attn.q_proj, nn.Linear)

    differ = [adapters[0], _random_adapters(base_dir, LoraParams(target_modules=["q_proj"]), 1)[0]]
    assert "other modules" in batched_lora_refusal(base, differ)


def test_model_runner_stacks_what_stacked_llama_takes_and_loops_over_the_rest():
    same = _models(seeds=(1, 2))
    assert StackedLlama.refusal(same) is None
    runner: Runner = model_runner(same, batched=True)
    assert isinstance(runner, StackedLlama) and runner.batched and runner.num_models == 2
    assert isinstance(model_runner(_models(seeds=(1, 2)), batched=False), ModelLoop)

    mixed = _models(seeds=(1,)) + _models(seeds=(2,), hidden_size=64)
    assert "hidden_size" in StackedLlama.refusal(mixed)
    loop = model_runner(mixed, batched=True)
    assert isinstance(loop, ModelLoop) and not loop.batched
    ids = torch.tensor([[1, 2, 3]])
    logits, _ = loop(ids)
    assert logits.shape[:3] == (2, 1, 3)
    assert StackedLlama.refusal([]) == "StackedLlama needs at least one model"
