"""The posterior combination (ensemble.combine: posterior): weights by the context, the same in every path.

Its defining identity, checked in float64: with beta 1 and no floor, the per-token combined log-probabilities of
a text sum to log sum_k pi_k p_k(text), the mixture of the constituents' whole-text probabilities. The cached
generation loop, a left-padded batch, transformers' generate() (greedy, sampling, beams) and evaluation must
all give what a forward over the whole text gives."""

from __future__ import annotations

import math

import pytest
import torch

from sisaflow.core.config import PosteriorParams
from sisaflow.core.errors import ConfigError
from sisaflow.inference.combine import posterior_log_weights
from sisaflow.inference.ensemble import Ensemble
from tests.unit.inference.test_ensemble import (
    PROMPTS,
    IdTokenizer,
    _greedy_without_cache,
    _models,
    assert_a_batch_generates_what_each_prompt_alone_does,
)
from tests.unit.models.test_lora import base_dir  # noqa: F401  (fixture)

# float64 models: two computations of one function in float64 differ by ~1e-13 here (width 32, 2 layers, a few
# dozen cached steps: rounding_bound in test_stacked.py), so 1e-9 bounds arithmetic, not luck
ATOL = 1e-9


@pytest.fixture
def models64(make_params):
    return [m.double() for m in _models(make_params)]


def _ensemble(models, tokenizer=None, weights=(1.0, 2.0, 3.0), **posterior) -> Ensemble:
    return Ensemble(
        models, list(weights), "posterior", tokenizer or IdTokenizer(), posterior=PosteriorParams(**posterior)
    )


def _text_log_prob(model, ids: list[int]) -> float:
    """log p(ids[1:] | ids[0]) under one model, straight from its own forward."""
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
    return float(sum(lp[t, ids[t + 1]] for t in range(len(ids) - 1)))


def assert_beam_scores_are_sequence_log_probs(beams, width: int, ens: Ensemble) -> None:
    """Each returned beam's score (length_penalty 0) is the sum of its new tokens' log-probabilities under `ens`,
    from one forward over the finished sequence. generate() reads them as float32: n tokens, each rounded
    (eps/2 relative) and summed in float32 (n eps of the running sum), so 2 n eps32 |total| bounds the rest."""
    for seq, score in zip(beams.sequences, beams.sequences_scores):
        lp = ens(seq[None]).logits[0]
        n = len(seq) - width
        total = float(sum(lp[t - 1, seq[t]] for t in range(width, len(seq))))
        assert float(score) == pytest.approx(total, abs=2 * n * torch.finfo(torch.float32).eps * abs(total))


def test_posterior_is_the_mixture_of_whole_text_probabilities(models64):
    ens = _ensemble(models64)
    ids = list(b"Question: who wrote it? Answer: Ada")
    per_model = [_text_log_prob(m, ids) for m in models64]
    prior = [1 / 6, 2 / 6, 3 / 6]
    expected = math.log(sum(p * math.exp(ll) for p, ll in zip(prior, per_model)))
    lp = ens(torch.tensor([ids])).logits[0]
    got = float(sum(lp[t, ids[t + 1]] for t in range(len(ids) - 1)))
    assert got == pytest.approx(expected, abs=ATOL)
    # and it is not the per-token mixture: the weights moved
    mixture = Ensemble(models64, list(prior), "mixture", IdTokenizer())(torch.tensor([ids])).logits[0]
    assert abs(float(sum(mixture[t, ids[t + 1]] for t in range(len(ids) - 1))) - got) > 1e-3
    # never more than ln(1/pi_k) worse than any constituent on the whole text
    assert all(got >= ll + math.log(p) - ATOL for ll, p in zip(per_model, prior))


@pytest.mark.parametrize("posterior", [{}, {"beta": 0.5, "floor": 0.2}, {"top_k": 2}, {"top_k": 1}])
def test_a_cached_forward_token_by_token_equals_one_forward(models64, posterior):
    ens = _ensemble(models64, **posterior)
    ids = torch.tensor([list(b"The author of the book was born in Paris.")])
    whole = ens(ids).logits
    out = ens(ids[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, ids.shape[1]):
        out = ens(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    if posterior.get("top_k"):
        # routed once after the 5-token prompt: the prompt's positions agree, later ones keep that choice
        torch.testing.assert_close(cached[:, :5], whole[:, :5], rtol=0, atol=ATOL)
        assert out.past_key_values.selected.shape == (1, posterior["top_k"])
    else:
        torch.testing.assert_close(cached, whole, rtol=0, atol=ATOL)


def test_greedy_generation_with_cache_equals_recomputing_without(models64):
    ens = _ensemble(models64, floor=0.1)
    prompt = "Question: what is 2 plus 2?"
    expected, gaps = _greedy_without_cache(ens, list(prompt.encode()), 25)
    assert len(set(expected)) >= 8 and min(gaps) > 1e-6
    assert ens.generate(prompt, max_new_tokens=25) == ",".join(map(str, expected))


def test_padding_never_counts_a_batch_generates_what_each_prompt_alone_does(models64):
    assert_a_batch_generates_what_each_prompt_alone_does(_ensemble(models64, floor=0.05))
    # the scores themselves: a left-padded row's weights equal its weights alone
    ens = _ensemble(models64)
    x, mask = ens.encode_prompts(PROMPTS)
    assert mask is not None
    out = ens(x, attention_mask=mask, use_cache=True, logits_to_keep=1)
    # padding shifts a row's positions, and rotary angles are computed in float32 (as in transformers): each of
    # the `width` positions' angles is off by up to eps32 * width, which the 2 layers carry into every value
    # (relative), the float64 weights notwithstanding; a counted padding token would move a score by ~5
    rtol = torch.finfo(torch.float32).eps * x.shape[1] * 2
    for row, prompt in enumerate(PROMPTS):
        alone = ens(ens.encode_prompts([prompt])[0], use_cache=True, logits_to_keep=1)
        torch.testing.assert_close(
            out.past_key_values.scores[:, row], alone.past_key_values.scores[:, 0], rtol=rtol, atol=ATOL
        )
        torch.testing.assert_close(out.logits[row], alone.logits[0], rtol=rtol, atol=rtol * 10)


def test_top_1_generation_is_the_chosen_constituent_alone(models64):
    ens = _ensemble(models64, top_k=1)
    prompt = "Question: what is 2 plus 2?"
    weights = ens.routing_weights(prompt)
    assert sorted(weights)[:2] == [0.0, 0.0] and max(weights) == pytest.approx(1.0)
    chosen = weights.index(max(weights))
    alone = Ensemble([models64[chosen]], [1.0], "mixture", IdTokenizer())
    assert ens.generate(prompt, max_new_tokens=20) == alone.generate(prompt, max_new_tokens=20)


def test_routing_weights_find_the_constituent_that_wrote_a_text(models64):
    ens = _ensemble(models64, weights=(1, 1, 1))
    for k, model in enumerate(models64):
        one = Ensemble([model], [1.0], "mixture", IdTokenizer())
        text = "".join(chr(int(t)) for t in one.generate("Hi", max_new_tokens=30).split(",") if t)
        weights = ens.routing_weights("Hi" + text)
        assert sum(weights) == pytest.approx(1.0)
        assert weights.index(max(weights)) == k
    # a floor keeps every constituent at floor / S at least
    floored = _ensemble(models64, weights=(1, 1, 1), floor=0.3).routing_weights("Hi there")
    assert min(floored) >= 0.1 - 1e-12


def test_floor_and_top_k_weights():
    prior = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    scores = torch.tensor([[[-1.0]], [[-30.0]], [[-2.0]], [[-40.0]]], dtype=torch.float64)  # (S, B, T)
    w = posterior_log_weights(prior, scores, PosteriorParams()).exp()[:, 0, 0]
    expected = torch.softmax(scores[:, 0, 0], dim=0)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)
    w = posterior_log_weights(prior, scores, PosteriorParams(floor=0.2)).exp()[:, 0, 0]
    torch.testing.assert_close(w, 0.8 * expected + 0.05, rtol=0, atol=1e-15)
    w = posterior_log_weights(prior, scores, PosteriorParams(top_k=2, floor=0.2)).exp()[:, 0, 0]
    top = torch.softmax(torch.tensor([-1.0, -2.0], dtype=torch.float64), dim=0) * 0.8 + 0.1
    torch.testing.assert_close(
        w, torch.tensor([top[0], 0, top[1], 0], dtype=torch.float64), rtol=0, atol=1e-15
    )
    w = posterior_log_weights(prior, scores, PosteriorParams(beta=0.5)).exp()[:, 0, 0]
    torch.testing.assert_close(w, torch.softmax(0.5 * scores[:, 0, 0], dim=0), rtol=0, atol=1e-15)


def test_transformers_generate_follows_the_posterior_greedy_sampled_and_beams(models64):
    from sisaflow.inference.hf import EnsembleForCausalLM

    ens = _ensemble(models64, floor=0.05)
    model = EnsembleForCausalLM(ens)
    batch = model.encode(PROMPTS[:2])
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert model.decode(out, width) == ens.generate(PROMPTS[:2], max_new_tokens=12)
    # sampling that keeps only the most likely token is greedy decoding
    sampled = model.generate(**batch, max_new_tokens=12, do_sample=True, top_k=1)
    assert torch.equal(sampled, out)
    # beam search reorders the cache, the running scores with it: each returned beam's score (length_penalty 0:
    # the sum of its tokens' log-probabilities) is what one forward over the finished sequence gives
    one = model.encode(PROMPTS[0])
    width = one["input_ids"].shape[1]
    beams = model.generate(
        **one,
        max_new_tokens=8,
        min_new_tokens=8,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert len({tuple(r) for r in beams.sequences.tolist()}) == 3
    assert_beam_scores_are_sequence_log_probs(beams, width, ens)


def test_selecting_cache_rows_carries_each_rows_scores(models64):
    """What beam search does between steps: rows reordered and repeated; each then continues as it would alone."""
    ens = _ensemble(models64, floor=0.05)
    prompts = [list(b"Question: who is she?"), list(b"The book was written")]
    prompts[1] = prompts[1][: len(prompts[0])] + [32] * (len(prompts[0]) - len(prompts[1]))
    x = torch.tensor(prompts)
    out = ens(x, use_cache=True, logits_to_keep=1)
    rows = torch.tensor([1, 0, 1])
    cache = ens.select_cache_rows(out.past_key_values, rows)
    nxt = torch.tensor([[65], [66], [67]])
    got = ens(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    for i, r in enumerate(rows.tolist()):
        alone = ens(torch.tensor([prompts[r] + [int(nxt[i, 0])]])).logits[0, -1]
        torch.testing.assert_close(got[i], alone, rtol=0, atol=ATOL)


def test_bad_settings_name_the_key(make_params):
    with pytest.raises(ConfigError, match="ensemble.combine.*mixture, posterior, product, merge"):
        make_params(ensemble={"combine": "median"})
    with pytest.raises(ConfigError, match=r"ensemble.posterior.floor = 1.0 .*>= 0 and < 1"):
        make_params(ensemble={"combine": "posterior", "posterior": {"floor": 1.0}})
    with pytest.raises(ConfigError, match=r"ensemble.posterior.floor = -0.1"):
        make_params(ensemble={"combine": "posterior", "posterior": {"floor": -0.1}})
    with pytest.raises(ConfigError, match=r"ensemble.posterior.top_k = 0 .*1 to sharding.shards"):
        make_params(ensemble={"combine": "posterior", "posterior": {"top_k": 0}})
    with pytest.raises(ConfigError, match=r"ensemble.posterior.top_k = 3 .*1 to sharding.shards \(2\)"):
        make_params(sharding={"shards": 2}, ensemble={"combine": "posterior", "posterior": {"top_k": 3}})
    with pytest.raises(
        ConfigError, match=r"ensemble.posterior.top_k is set but ensemble.combine = 'mixture'"
    ):
        make_params(ensemble={"combine": "mixture", "posterior": {"top_k": 1}})
    with pytest.raises(ConfigError, match=r"ensemble.posterior: unknown key\(s\) alpha"):
        make_params(ensemble={"combine": "posterior", "posterior": {"alpha": 0.1}})
    ok = make_params(sharding={"shards": 2}, ensemble={"combine": "posterior", "posterior": {"top_k": 2}})
    assert ok.ensemble.posterior == PosteriorParams(top_k=2)


# ------------------------------------------------------------------- top_k over LoRA: only the kept constituents run


@pytest.fixture(scope="module")
def lora64(base_dir):  # noqa: F811
    """Three random LoRA adapters over the tiny base, stacked, in float64; and their adapters."""
    from sisaflow.core.config import LoraParams
    from sisaflow.inference.lora_runners import stacked_lora
    from sisaflow.models.pretrained import load_base_model
    from tests.unit.models.test_lora import _random_adapters

    adapters = [{k: v.double() for k, v in a.items()} for a in _random_adapters(base_dir, LoraParams(), 3)]
    base = load_base_model(str(base_dir)).double()
    return stacked_lora(base, adapters, 2.0, 96), adapters, base_dir


def _lora_ensemble(lora64, **posterior) -> Ensemble:
    from sisaflow.models.tokenizer import load_tokenizer

    runner, _, base = lora64
    tok = load_tokenizer("base", str(base))
    return Ensemble(
        [],
        [1.0, 2.0, 3.0],
        "posterior",
        tok,
        runner=runner,
        context_length=96,
        posterior=PosteriorParams(**posterior),
    )


@pytest.mark.parametrize("k", [1, 2])
def test_routed_top_k_runs_only_the_kept_constituents_and_gives_the_same_numbers(lora64, k):
    from sisaflow.inference.stacked import StackedLlama

    fast, slow = _lora_ensemble(lora64, top_k=k, floor=0.1), _lora_ensemble(lora64, top_k=k, floor=0.1)
    slow.routing_fast = False
    x, mask = fast.encode_prompts(["Question: who is she?", "Where"])
    outs = []
    for ens in (fast, slow):
        out = ens(x, attention_mask=mask, use_cache=True, logits_to_keep=1)
        steps = [out.logits[:, -1]]
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(6):
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1) if mask is not None else None
            out = ens(tokens, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        outs.append((torch.stack(steps, 1), out.past_key_values))
        x, mask = fast.encode_prompts(["Question: who is she?", "Where"])
    (a, cache_a), (b, cache_b) = outs
    assert isinstance(cache_a.view, StackedLlama) and cache_a.view.num_models == k  # k slots ran, not 3
    assert cache_a.inner.keys[0].shape[0] == k and cache_b.view is None
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    assert fast.generate(["Question: who is she?", "Where"], max_new_tokens=10) == slow.generate(
        ["Question: who is she?", "Where"], max_new_tokens=10
    )


def test_routed_top_1_over_lora_is_the_chosen_adapter_alone_and_follows_beams(lora64):
    from sisaflow.inference.hf import EnsembleForCausalLM
    from sisaflow.inference.lora_runners import stacked_lora

    runner, adapters, base = lora64
    ens = _lora_ensemble(lora64, top_k=1)
    prompt = "Question: who is she?"
    weights = ens.routing_weights(prompt)
    chosen = weights.index(max(weights))
    from sisaflow.models.pretrained import load_base_model

    one = stacked_lora(load_base_model(str(base)).double(), [adapters[chosen]], 2.0, 96)
    alone = Ensemble([], [1.0], "mixture", ens.tokenizer, runner=one, context_length=96)
    assert ens.generate(prompt, max_new_tokens=12) == alone.generate(prompt, max_new_tokens=12)
    # beam search over the routed view: each beam's score is its sequence's log-probability under the ensemble
    model = EnsembleForCausalLM(ens)
    batch = model.encode(prompt)
    width = batch["input_ids"].shape[1]
    beams = model.generate(
        **batch,
        max_new_tokens=6,
        min_new_tokens=6,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert_beam_scores_are_sequence_log_probs(beams, width, alone)


def test_selecting_rows_of_a_routed_cache_moves_each_rows_constituents(lora64):
    ens = _lora_ensemble(lora64, top_k=1)
    tok = ens.tokenizer
    prompts = [tok.encode("Question: who is she?"), tok.encode("The river ran north")]
    width = min(map(len, prompts))
    prompts = [p[:width] for p in prompts]
    out = ens(torch.tensor(prompts), use_cache=True, logits_to_keep=1)
    out = ens(torch.tensor([[11], [12]]), past_key_values=out.past_key_values, use_cache=True)
    assert out.past_key_values.view is not None
    assert out.past_key_values.selected[0, 0] != out.past_key_values.selected[1, 0], "rows must route apart"
    rows = torch.tensor([1, 0, 1])
    cache = ens.select_cache_rows(out.past_key_values, rows)
    got = ens(torch.tensor([[13], [14], [15]]), past_key_values=cache, use_cache=True).logits[:, -1]
    for i, r in enumerate(rows.tolist()):
        alone = ens(torch.tensor([prompts[r]]), use_cache=True, logits_to_keep=1)
        alone = ens(torch.tensor([[11 + r]]), past_key_values=alone.past_key_values, use_cache=True)
        alone = ens(torch.tensor([[13 + i]]), past_key_values=alone.past_key_values, use_cache=True)
        torch.testing.assert_close(got[i], alone.logits[0, -1], rtol=0, atol=ATOL)


def test_a_posterior_workspace_serves_and_the_cli_shows_the_routing(
    make_records, make_served, make_params, capsys
):
    """Registered with its settings, loaded back, and `generate --show-routing` prints each shard's weight."""
    from sisaflow import cli
    from sisaflow.inference.registry import read_registry

    params = make_params(
        sharding={"shards": 2, "slices": 1}, ensemble={"combine": "posterior", "posterior": {"floor": 0.25}}
    )
    ws = make_served(make_records(owners=4, per_owner=2), params)
    assert read_registry(ws)["posterior"] == {"beta": 1.0, "floor": 0.25, "top_k": None}
    ens = Ensemble.load(ws)
    assert ens.combine == "posterior" and ens.posterior == PosteriorParams(floor=0.25)
    weights = ens.routing_weights("Question: who?")
    assert min(weights) >= 0.125 - 1e-12 and sum(weights) == pytest.approx(1.0)
    assert (
        cli.main(
            [
                "--workspace",
                str(ws.root),
                "generate",
                "--show-routing",
                "--max-new-tokens",
                "4",
                "Question: who?",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out == "Question: who?" + ens.generate("Question: who?", max_new_tokens=4) + "\n"
    top = weights.index(max(weights))
    parts = [
        f"{'*' if i == top else ''}shard {s} {w:.3f}" for i, (s, w) in enumerate(zip(ens.shards, weights))
    ]
    assert captured.err.strip().endswith("routing (posterior): " + ", ".join(parts))
