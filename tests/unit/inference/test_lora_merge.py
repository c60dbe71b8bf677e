"""ensemble.combine: merge: the LoRA constituents served as one model, the base plus the weighted mean of the
adapters' deltas. Checked in float64 against peft computing the same mean as one adapter of rank S*r (factors
concatenated, B's scaled by the weights), and as the exact function of the adapters that keeps a forget exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from sisaflow.core.config import LoraParams, Params
from sisaflow.core.errors import ConfigError
from sisaflow.inference.ensemble import Ensemble
from sisaflow.inference.lora_runners import merged_model
from sisaflow.inference.registry import read_registry
from sisaflow.models.lora import ADAPTER, attach_adapters, load_adapter_state
from sisaflow.models.pretrained import load_base_model
from sisaflow.training.checkpoint import MODEL_FILE
from tests.lora_base import save_tiny_base

# float64 end to end: what is left is rounding of sums of a few hundred terms, ~1e-16 relative each
FLOAT64_ATOL = 1e-10


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


def _random_adapters(model_params, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """n adapters of the tiny base with random A and B (B nonzero, so each delta matters)."""
    from sisaflow.models.lora import adapter_state

    peft = attach_adapters(load_base_model(model_params.base), model_params.lora, [ADAPTER], 0)
    keys = adapter_state(peft)
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) * 0.3 for k, v in keys.items()} for _ in range(n)]


def test_merge_is_the_weighted_mean_of_the_deltas(base_dir, make_params):
    params = make_params(model={"tokenizer": "base", "base": str(base_dir)})
    mp = params.model
    adapters, weights = _random_adapters(mp, 3, seed=1), [1.0, 2.0, 5.0]
    merged = merged_model(mp, adapters, weights, dtype=torch.float64)

    # the same mean as one peft adapter of rank 3r: A's stacked, B's concatenated and scaled by w_s
    w = [x / sum(weights) for x in weights]
    r = mp.lora.r
    wide = dataclasses.replace(mp.lora, r=3 * r, alpha=mp.lora.alpha * 3)  # same scale alpha / r
    ref = attach_adapters(load_base_model(mp.base), wide, [ADAPTER], 0).double()
    cat = {}
    for key in adapters[0]:
        if ".lora_A." in key:
            cat[key] = torch.cat([a[key].double() for a in adapters], dim=0)
        else:
            cat[key] = torch.cat([a[key].double() * ws for a, ws in zip(adapters, w)], dim=1)
    load_adapter_state(ref, cat)
    ref = ref.eval()

    x = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        got, want = merged(x).logits, ref(x).logits
    assert (got - want).abs().max().item() <= FLOAT64_ATOL
    base = load_base_model(mp.base).double()
    with torch.no_grad():
        assert (got - base(x).logits).abs().max().item() > 1e-3  # the deltas changed the model


def test_a_served_merge_is_one_model_and_a_fixed_function_of_the_adapters(
    base_dir, make_params, make_records, make_served
):
    over = {"model": {"tokenizer": "base", "base": str(base_dir)}, "sharding": {"shards": 2, "slices": 2}}
    params = make_params(**over, ensemble={"combine": "merge"})
    ws = make_served(make_records(owners=6, per_owner=2), params)
    ens = Ensemble.load(ws)
    assert ens.runner.num_models == 1 and ens.shards == [0, 1]
    reg = read_registry(ws)
    adapters = [load_file(str(ws.root / c["served"] / MODEL_FILE)) for c in reg["constituents"]]
    again = merged_model(params.model, adapters, [1.0, 1.0])
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(ens.runner(x)[0][0], again(x).logits)
    assert isinstance(ens.generate("Question: what?\nAnswer:", max_new_tokens=4), str)
    assert ens.score("Question: what is 1 plus 1? Answer: 2")["log_likelihood"] < 0


def test_merge_needs_lora_constituents(make_params):
    with pytest.raises(ConfigError, match="ensemble.combine = 'merge' needs LoRA"):
        make_params(ensemble={"combine": "merge"})
    with pytest.raises(ConfigError, match="ensemble.combine"):
        make_params(ensemble={"combine": "average"})
    assert isinstance(Params().ensemble.combine, str) and LoraParams().r == 8


def test_evaluate_scores_a_merged_ensemble_as_one_model(base_dir, make_params, make_records, make_served):
    from sisaflow.evaluation.evaluate import evaluate

    over = {"model": {"tokenizer": "base", "base": str(base_dir)}, "sharding": {"shards": 2, "slices": 2}}
    params = make_params(
        **over, ensemble={"combine": "merge"}, evaluate={"rouge_records": 2, "rouge_new_tokens": 4}
    )
    ws = make_served(make_records(owners=6, per_owner=2), params)
    out = evaluate(ws, params, baseline=False)
    assert (
        out["constituents_served"] == 2 and out["utility"]["constituents"] == []
    )  # none of its own to score
    assert out["utility"]["ensemble"]["retained"] > 1.0
