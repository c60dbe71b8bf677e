"""batched: one stacked forward over S constituents gives each constituent's own transformers output, with and
without a KV cache, under left padding, and the same greedy ensemble generation as the loop over models."""

from __future__ import annotations

import pytest
import torch

from sisaflow.core.config import ModelParams
from sisaflow.inference.combine import combine_log_probs
from sisaflow.inference.ensemble import Ensemble
from sisaflow.inference.runners import cache_kwarg, cache_of
from sisaflow.inference.stacked import StackedLlama, stacked_log_probs
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import ByteTokenizer

VOCAB, EOS = ByteTokenizer.vocab_size, ByteTokenizer.eos_id
ROUNDING_C = 1.0  # see rounding_bound


def rounding_bound(scale: float, width: int, depth: int, dtype: torch.dtype = torch.float32) -> float:
    """How far two computations of one function, equal in exact arithmetic, may differ by rounding alone: the
    tolerance of every comparison of two code paths here (and in tests/unit/models/test_lora.py), derived rather than
    measured, so that it holds on any machine. `scale` is the magnitude of the compared values (the reference's
    largest |value|), `width` the length of the dot products (the hidden size), `depth` the number of chained
    stages (decoder layers, times the forward passes a KV cache chains).

    A dot product of length n summed in floating point is off by at most about n * u * sum |x_i y_i|, u = eps / 2
    the unit roundoff (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.1). Two paths that
    order the sums differently (a bmm against peft's two linear layers, StackedLlama's kernels against
    transformers', another machine's SIMD width or FMA use) each err so: n * eps of the magnitude between them.
    The errors of chained stages add: every decoder layer's, and on a cached decode every earlier step's, since a
    step attends to keys and values that earlier steps computed and rounded (attention averages them rather than
    adding them, so growth linear in the steps is an upper estimate). Hence

        ROUNDING_C * eps(dtype) * scale * width * depth.

    The a-priori bound overestimates the rounding itself (the errors of a sum mostly cancel: sqrt(n) rather than
    n) and leaves out how much the layers amplify a perturbation; one pays for the other, so ROUNDING_C = 1. On the
    tiny models of these tests (width 32, 2 layers) that is 1.5e-3 for 20 cached steps of LoRA log-probabilities
    up to 9.7 in magnitude, where rounding differences of 1.1e-4 were seen (on two AVX512 machines) and a wrong
    adapter in one layer, a cache row of another constituent or a LoRA scale 1% off moves them by 0.87 to 5.6; in
    float64 (eps 2^-52, 2^29 times finer) it is 1e-13 to 3e-12, the exactness docs/serving.md states."""
    return ROUNDING_C * torch.finfo(dtype).eps * scale * width * depth


def _params(tie: bool = True, **kw) -> ModelParams:
    base = dict(
        hidden_size=32, layers=2, heads=2, intermediate_size=64, context_length=64, tie_embeddings=tie
    )
    return ModelParams(**{**base, **kw})  # type: ignore[arg-type]


WIDTH, LAYERS = _params().hidden_size, _params().layers  # the shape rounding_bound reads


def _bound(reference: torch.Tensor, forwards: int = 1) -> float:
    """rounding_bound of a comparison with `reference` after `forwards` chained forward passes (1: no cache)."""
    return rounding_bound(float(reference.abs().max()), WIDTH, LAYERS * forwards)


def _models(seeds=(1, 2, 3), tie: bool = True, **kw):
    """Tiny Llamas with weights of std 2/sqrt(fan_in) and norm gains around 1.

    The default init (std 0.02) gives near-uniform outputs that would hide a wrong rotary or a wrong cache
    within the tolerance; these give context-dependent logits of a few nats."""
    models = []
    for s in seeds:
        m = build_model(_params(tie, **kw), VOCAB, EOS, s)
        g = torch.Generator().manual_seed(100 + s)
        with torch.no_grad():
            for w in m.parameters():
                if w.dim() == 2:
                    w.copy_(torch.randn(w.shape, generator=g) * 2.0 / w.shape[1] ** 0.5)
                else:
                    w.copy_(1 + 0.3 * torch.randn(w.shape, generator=g))
        models.append(m.eval())
    return models


def _scaled(m):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for w in m.parameters():
            w.copy_(
                torch.randn(w.shape, generator=g) * 2.0 / w.shape[1] ** 0.5 if w.dim() == 2 else 1 + 0.3 * w
            )
    return m.eval()


def _gqa_models(seeds=(1, 2)):
    """Tiny Llamas with 4 query heads over 2 key/value heads (the library builds full heads; pretrained bases
    such as SmolLM2 group them)."""
    from transformers import LlamaForCausalLM

    from sisaflow.models.scratch import model_config

    out = []
    for s in seeds:
        cfg = model_config(_params(heads=4), VOCAB, EOS)
        cfg.num_key_value_heads = 2
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(s)
        out.append(_scaled(LlamaForCausalLM(cfg)))
    return out


def _ids(batch: int, steps: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))


def _hf_log_probs(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids, **kw).logits.double(), dim=-1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("s", [1, 3])
def test_stacked_forward_equals_each_model(s, tie):
    models = _models(seeds=tuple(range(1, s + 1)), tie=tie)
    stacked = StackedLlama.from_models(models)
    assert stacked.tied == tie
    ids = _ids(2, 24)
    logits, cache = stacked(ids)
    assert logits.shape == (s, 2, 24, VOCAB) and cache is None
    lp = torch.log_softmax(logits.double(), dim=-1)
    for i, m in enumerate(models):
        want = _hf_log_probs(m, ids)
        assert _max_diff(lp[i], want) <= _bound(want)
    if s > 1:  # the constituents really differ, so a mixed-up S order would fail
        assert _max_diff(lp[0], lp[1]) > 0.5
    # the same computation as lp, or within its rounding
    assert _max_diff(stacked_log_probs(models, ids), lp) <= _bound(lp)
    last, _ = stacked(ids, logits_to_keep=1)  # the head on one position: another product shape, same values
    assert _max_diff(last.double(), logits[:, :, -1:].double()) <= _bound(logits)


@pytest.mark.parametrize("tie", [True, False])
def test_prefill_then_decode_with_cache_equals_transformers_with_its_cache(tie):
    models = _models(tie=tie)
    stacked = StackedLlama.from_models(models)
    ids = _ids(2, 12 + 3 + 10, seed=1)
    chunks = [ids[:, :12], ids[:, 12:15]] + [ids[:, t : t + 1] for t in range(15, 25)]
    hf_caches: list = [None] * len(models)
    cache = None
    # prefill, one 3-token chunk on top of the cache, then 10 single-token steps
    for forwards, chunk in enumerate(chunks, 1):
        logits, cache = stacked(chunk, cache=cache, use_cache=True)
        lp = torch.log_softmax(logits.double(), dim=-1)
        for i, m in enumerate(models):
            with torch.no_grad():
                out = m(input_ids=chunk, use_cache=True, **{cache_kwarg(m): hf_caches[i]})
            hf_caches[i] = cache_of(out)
            want = torch.log_softmax(out.logits.double(), dim=-1)
            assert _max_diff(lp[i], want) <= _bound(want, forwards)
    assert cache is not None and cache.get_seq_length() == 25 == hf_caches[0].get_seq_length()


def test_cache_and_rotary_table_grow_past_their_initial_size():
    models = _models(seeds=(4, 5))
    stacked = StackedLlama.from_models(models)
    ids = _ids(1, 70, seed=2)  # beyond context_length 64, as transformers allows
    cache = stacked.new_cache(1, capacity=4)
    stacked(ids[:, :6], cache=cache)
    for t in range(6, 70):
        logits, cache = stacked(ids[:, t : t + 1], cache=cache)
    assert cache is not None and cache.length == 70 and cache.capacity >= 70
    for i, m in enumerate(models):
        want = _hf_log_probs(m, ids)[:, -1:]
        assert _max_diff(torch.log_softmax(logits[i].double(), -1), want) <= _bound(want, 1 + 64)


def test_left_padded_batch_equals_each_prompt_alone_then_decodes():
    models = _models()
    stacked = StackedLlama.from_models(models)
    long, short = _ids(1, 10, seed=3)[0], _ids(1, 6, seed=4)[0]
    ids = torch.stack([long, torch.cat([torch.full((4,), EOS), short])])
    mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
    logits, cache = stacked(ids, attention_mask=mask, use_cache=True)
    assert torch.isfinite(logits).all()
    lp = torch.log_softmax(logits.double(), dim=-1)
    nxt = _ids(2, 5, seed=5)
    for t in range(5):  # decode without a mask: the cache remembers the padding
        step, cache = stacked(nxt[:, t : t + 1], cache=cache)
        lp = torch.cat([lp, torch.log_softmax(step.double(), dim=-1)], dim=2)
    for i, m in enumerate(models):
        alone_long = _hf_log_probs(m, torch.cat([long, nxt[0]])[None])[0]
        alone_short = _hf_log_probs(m, torch.cat([short, nxt[1]])[None])[0]
        assert _max_diff(lp[i, 0], alone_long) <= _bound(alone_long, 1 + 5)
        assert _max_diff(lp[i, 1, 4:], alone_short) <= _bound(alone_short, 1 + 5)
        # and the padded prefill equals transformers given the same mask, at the real tokens
        padded = _hf_log_probs(m, ids, attention_mask=mask)[1, 4:]
        assert _max_diff(lp[i, 1, 4:10], padded) <= _bound(padded)


def test_an_all_ones_mask_equals_no_mask_and_a_wrong_shape_is_refused():
    stacked = StackedLlama.from_models(_models(seeds=(1, 2)))
    ids = _ids(3, 8)
    a, _ = stacked(ids)
    b, _ = stacked(ids, attention_mask=torch.ones(3, 8, dtype=torch.long))
    assert _max_diff(a.double(), b.double()) <= _bound(a)  # another attention kernel (masked), same values
    with pytest.raises(ValueError, match="attention_mask"):
        stacked(ids, attention_mask=torch.ones(3, 7))
    _, cache = stacked(ids, use_cache=True)
    with pytest.raises(ValueError, match="batch"):
        stacked(_ids(2, 1), cache=cache)


def _stacked_greedy(stacked, weights, combine, prompt: list[int], max_new: int) -> tuple[list[int], float]:
    """Greedy generation of the combined ensemble, as Ensemble.generate does it, on the stacked model."""
    logits, cache = stacked(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    new, gap = [], float("inf")
    for _ in range(max_new):
        lp = combine_log_probs(torch.log_softmax(logits.double(), dim=-1), weights, combine)[0, -1]
        top2 = torch.topk(lp, 2).values
        gap = min(gap, float(top2[0] - top2[1]))
        token = int(lp.argmax())
        if token == EOS:
            break
        new.append(token)
        logits, cache = stacked(torch.tensor([[token]]), cache=cache)
    return new, gap


class IdTokenizer(ByteTokenizer):
    """Decodes to the token ids, so generations compare exactly."""

    def decode(self, ids: list[int]) -> str:
        return ",".join(map(str, ids))


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_greedy_generation_equals_the_loop_over_models(combine):
    models = _models(tie=False)
    ens = Ensemble(models, [1.0, 2.0, 3.0], combine, IdTokenizer(), batched=False)
    prompt = "Question: what is 2 plus 2?"
    expected = ens.generate(prompt, max_new_tokens=25)  # the Python loop over models, one cache each
    got, gap = _stacked_greedy(
        StackedLlama.from_models(models), ens.weights, combine, list(prompt.encode()), 25
    )
    assert len(got) >= 20 and len(set(got)) >= 8, "the test models must give varied output"
    assert gap > 1e-5, "a near tie would make the comparison meaningless"
    assert ",".join(map(str, got)) == expected


def test_models_of_different_configs_or_unsupported_features_are_refused():
    base = _models(seeds=(1,))
    with pytest.raises(ValueError, match="hidden_size"):
        StackedLlama.from_models(base + _models(seeds=(2,), hidden_size=64))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        StackedLlama.from_models(base + _models(seeds=(2,), context_length=32))
    with pytest.raises(ValueError, match="dtype"):
        StackedLlama.from_models(base + [_models(seeds=(2,))[0].double()])
    odd = _models(seeds=(1,), heads=4)[0]
    odd.config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="4 heads over 3 key/value heads"):
        StackedLlama.from_models([odd])
    with pytest.raises(ValueError, match="at least one"):
        StackedLlama.from_models([])


# ------------------------------------------------------------------------------- wired into the Ensemble

# batched vs loop Ensemble, max abs difference of the combined log-probabilities, within rounding_bound: a full
# forward is bitwise equal (measured 0); with the cache, measured <= 2.8e-6 over 25 steps


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_the_ensemble_is_batched_by_default_and_equals_its_loop(combine):
    from sisaflow.inference.runners import ModelLoop

    models = _models(tie=False)
    fast = Ensemble(models, [1.0, 2.0, 3.0], combine, IdTokenizer())
    loop = Ensemble(models, [1.0, 2.0, 3.0], combine, IdTokenizer(), batched=False)
    assert isinstance(fast.runner, StackedLlama) and fast.batched
    assert isinstance(loop.runner, ModelLoop) and not loop.batched
    ids = _ids(2, 20)
    want = loop(ids).logits
    assert _max_diff(fast(ids).logits, want) <= _bound(want)
    prompt = torch.tensor([list(b"Question: what is 2 plus 2?")])
    of, ol = fast(prompt, use_cache=True), loop(prompt, use_cache=True)
    worst, scale, steps = 0.0, 0.0, _ids(1, 25, seed=9)[0]
    for t in steps:
        step = torch.tensor([[int(t)]])
        of = fast(step, past_key_values=of.past_key_values, use_cache=True)
        ol = loop(step, past_key_values=ol.past_key_values, use_cache=True)
        worst = max(worst, _max_diff(of.logits, ol.logits))
        scale = max(scale, float(ol.logits.abs().max()))
    assert worst <= rounding_bound(scale, WIDTH, LAYERS * (1 + len(steps)))
    text = "Question: who? Answer: Ada"
    want_ll = loop.score(text)["log_likelihood"]  # a sum of log-probabilities: its magnitude is their scale
    assert fast.score(text)["log_likelihood"] == pytest.approx(
        want_ll, abs=rounding_bound(-want_ll, WIDTH, LAYERS)
    )
    assert fast.generate("Question:", max_new_tokens=25) == loop.generate("Question:", max_new_tokens=25)


def test_constituents_the_stacked_model_cannot_take_are_looped():
    from sisaflow.inference.runners import ModelLoop

    models = _models(seeds=(1, 2))
    for m in models:  # a gated activation other than SiLU: not supported by StackedLlama
        m.config.hidden_act = "gelu"
    ens = Ensemble(models, [1.0, 1.0], "mixture", IdTokenizer())
    assert isinstance(ens.runner, ModelLoop) and not ens.batched


def test_load_follows_params_ensemble_batched(make_served, make_records, make_params):
    from sisaflow.inference.runners import ModelLoop

    ws = make_served(make_records(owners=4, per_owner=2), make_params(sharding={"shards": 2, "slices": 1}))
    ws.params_file.write_text("ensemble:\n  batched: false\n")
    assert isinstance(Ensemble.load(ws).runner, ModelLoop)
    assert isinstance(Ensemble.load(ws, batched=True).runner, StackedLlama)
    ws.params_file.write_text("")
    fast = Ensemble.load(ws)
    assert isinstance(fast.runner, StackedLlama)
    text = "Question: what is 1 plus 1?"
    slow = Ensemble.load(ws, batched=False)
    want = slow.score(text)["log_likelihood"]
    assert fast.score(text)["log_likelihood"] == pytest.approx(want, abs=rounding_bound(-want, WIDTH, LAYERS))


def test_grouped_key_value_heads_equal_transformers_with_and_without_cache():
    models = _gqa_models()
    stacked = StackedLlama.from_models(models)
    assert stacked.kv_heads == 2 and stacked.heads == 4
    ids = _ids(2, 12)
    logits, cache = stacked(ids, use_cache=True)
    assert cache is not None and cache.keys[0].shape[2] == 2  # the cache keeps the grouped heads only
    lp = torch.log_softmax(logits.double(), dim=-1)
    step = _ids(2, 1, seed=5)
    nxt, _ = stacked(step, cache=cache, use_cache=True)
    for i, m in enumerate(models):
        want = _hf_log_probs(m, ids)
        assert _max_diff(lp[i], want) <= _bound(want)
        full = _hf_log_probs(m, torch.cat([ids, step], dim=1))[:, -1]
        assert _max_diff(torch.log_softmax(nxt[i, :, -1].double(), -1), full) <= _bound(full, 2)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize(
    "models", [_models(tie=True), _models(tie=False), _gqa_models()], ids=["tied", "untied", "gqa"]
)
def test_share_with_leaves_one_copy_of_the_weights_and_changes_no_output(models):
    ids = _ids(2, 16, seed=3)
    before = [_hf_log_probs(m, ids) for m in models]
    stacked = StackedLlama.from_models(models)
    own = _storage_bytes(p for m in models for p in m.parameters())
    stack = _storage_bytes(stacked.parameters())
    assert (
        _storage_bytes([*stacked.parameters(), *(p for m in models for p in m.parameters())]) == own + stack
    )
    stacked.share_with(models)
    # every model weight now lies in the stack's storage: the two together take what the stack alone takes
    assert _storage_bytes([*stacked.parameters(), *(p for m in models for p in m.parameters())]) == stack
    for m, lp in zip(models, before):
        torch.testing.assert_close(_hf_log_probs(m, ids), lp, rtol=0, atol=0)
    logits, _ = stacked(ids)
    for i, lp in enumerate(before):
        assert _max_diff(torch.log_softmax(logits[i].double(), dim=-1), lp) <= _bound(lp)
    # a change through a model shows in the stack: they are one tensor now
    with torch.no_grad():
        models[0].model.norm.weight.add_(1.0)
    assert torch.equal(stacked.final_norm[0, 0], models[0].model.norm.weight)


def test_share_with_refuses_models_it_did_not_stack():
    models = _models(seeds=(1, 2))
    stacked = StackedLlama.from_models(models)
    with pytest.raises(ValueError, match="one per constituent"):
        stacked.share_with(models[:1])
    with pytest.raises(ValueError, match="changed since it was stacked"):
        stacked.share_with(list(reversed(models)))


def test_a_batched_ensemble_holds_its_constituents_weights_once():
    models = _models(seeds=(1, 2, 3))
    ids = _ids(1, 10, seed=4)
    loop = Ensemble(_models(seeds=(1, 2, 3)), [1.0, 1.0, 1.0], "mixture", ByteTokenizer(), batched=False)
    ens = Ensemble(models, [1.0, 1.0, 1.0], "mixture", ByteTokenizer())
    assert ens.batched
    stack = _storage_bytes(ens.runner.parameters())
    assert _storage_bytes(ens.parameters()) == stack  # the constituents add nothing
    want = loop(ids).logits
    torch.testing.assert_close(ens(ids).logits, want, rtol=0, atol=_bound(want))


def test_a_cache_keeps_the_rows_it_is_told_in_their_order():
    """StackedCache.select_rows (beam search): in place for as many rows, a new cache for more or fewer; the
    filled positions and the padding mask follow their rows, and decoding goes on from them."""
    stacked = StackedLlama.from_models(_models(seeds=(1, 2)))
    ids = _ids(3, 6, seed=4)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # row 2 left-padded
    for rows in ([2, 0, 0], [1, 2], [0, 1, 2, 2]):
        _, cache = stacked(ids, attention_mask=mask, use_cache=True)
        picked = torch.tensor(rows)
        cache.select_rows(picked)
        assert cache.batch_size == len(rows) and cache.length == 6
        step = _ids(len(rows), 1, seed=5)
        sub_mask = torch.cat([mask[picked], torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        want, _ = stacked(torch.cat([ids[picked], step], dim=1), attention_mask=sub_mask)
        # no mask with the new token: the cache's own padding mask must have followed its rows
        got, _ = stacked(step, cache=cache)
        assert _max_diff(got[:, :, -1], want[:, :, -1]) <= _bound(want[:, :, -1], 2)
