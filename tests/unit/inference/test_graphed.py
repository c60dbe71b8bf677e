"""The graph decoder (`sisaflow.inference.graphed`): the static-shape decode step gives `Ensemble.generate`'s
tokens and distributions. On the CPU the step runs eagerly on the same static shapes the graph would record
(padded batch, masked capacity, device-side position), so everything but the capture is checked where CI runs;
the `gpu` cases capture and replay on CUDA."""

from __future__ import annotations

import pytest
import torch

import sisaflow.inference.graphed as graphed
from sisaflow.inference.combine import combine_log_probs
from sisaflow.inference.ensemble import Ensemble
from sisaflow.inference.graphed import GraphDecoder, bucket
from sisaflow.inference.stacked import StackedLlama
from tests.unit.inference.test_stacked import WIDTH, IdTokenizer, _models, rounding_bound

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = ["Question: what is 2 plus 2?", "Hi", "Name an author of the nineteenth century, please."]


def _ensemble(combine: str = "mixture", batched: bool = True, **kw) -> Ensemble:
    models = _models(tie=False, **kw)
    return Ensemble(models, [1.0, 2.0, 3.0], combine, IdTokenizer(), batched=batched)


def _decoder(ens: Ensemble) -> GraphDecoder:
    assert isinstance(ens.runner, StackedLlama)
    return GraphDecoder(ens.runner, ens.weights, ens.combine, capture=False)


def _graph_texts(ens: Ensemble, dec: GraphDecoder, prompts, new: int, **kw) -> list[str]:
    x, mask = ens.encode_prompts(prompts, new)
    budget = min(new, ens.context_length - x.shape[1])
    return [ens.tokenizer.decode(t) for t in dec.generate(x, mask, budget, ens.tokenizer.eos_id, **kw)]


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_the_static_step_gives_the_eager_loops_tokens(combine):
    """Prompts of three lengths (left padding, a batch of 3 padded to 4 rows): greedy tokens equal to
    `Ensemble.generate` over the loop of transformers models, and over the stacked runner's eager steps."""
    loop, stacked = _ensemble(combine, batched=False), _ensemble(combine)
    want = loop.generate(PROMPTS, max_new_tokens=30)
    assert stacked.generate(PROMPTS, max_new_tokens=30) == want  # the CPU default: the eager loop
    assert stacked.graph_decoder() is None  # no CUDA here: generate falls back to it
    got = _graph_texts(stacked, _decoder(stacked), PROMPTS, 30)
    assert got == want
    assert all(len(t.split(",")) >= 10 for t in got), "the test models must give long, varied output"


@pytest.mark.parametrize(
    "posterior", [{}, {"floor": 0.1, "beta": 0.5}, {"top_k": 1}, {"top_k": 2, "floor": 0.2}]
)
def test_the_posterior_on_static_steps_gives_the_eager_loops_tokens_and_distributions(posterior):
    """combine posterior: the running scores on the device (the prefill scores each prompt position, each step
    adds its fed token) give the eager loop's greedy and sampled tokens, and its distributions teacher-forced
    within the rounding bound."""
    from sisaflow.core.config import PosteriorParams

    ens = _ensemble("posterior")
    ens.posterior = PosteriorParams(**posterior)
    dec = GraphDecoder(ens.runner, ens.weights, "posterior", capture=False, posterior=ens.posterior)
    want = ens.generate(PROMPTS, max_new_tokens=24)
    assert _graph_texts(ens, dec, PROMPTS, 24) == want
    assert want != _ensemble("mixture").generate(PROMPTS, max_new_tokens=24)  # the weights moved
    sampled = ens.generate(PROMPTS, max_new_tokens=16, temperature=0.9, seed=3)
    assert _graph_texts(ens, dec, PROMPTS, 16, temperature=0.9, seed=3) == sampled
    steps = 12
    x, mask = ens.encode_prompts(PROMPTS, steps)
    out = ens(x, attention_mask=mask, use_cache=True, logits_to_keep=1)
    expected, tokens = [], []
    for _ in range(steps):
        expected.append(out.logits[:, -1])
        tokens.append(expected[-1].argmax(-1, keepdim=True))
        mask = torch.cat([mask, mask.new_ones(len(PROMPTS), 1)], dim=1)
        out = ens(tokens[-1], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    got = dec.log_probs_along(x, ens.encode_prompts(PROMPTS, steps)[1], torch.cat(tokens, dim=1))
    for step in range(steps):
        # the weights sum every earlier step's rounding too: the bound of the whole prompt and the steps so far
        bound = rounding_bound(float(expected[step].abs().max()), WIDTH, 2 * (step + 1)) * (
            x.shape[1] + step + 1
        )
        assert float((got[:, step] - expected[step]).abs().max()) <= bound, step


def test_sampling_draws_what_the_eager_loop_draws():
    ens = _ensemble()
    want = ens.generate(PROMPTS, max_new_tokens=20, temperature=0.9, seed=7)
    assert _graph_texts(ens, _decoder(ens), PROMPTS, 20, temperature=0.9, seed=7) == want
    assert want != ens.generate(PROMPTS, max_new_tokens=20)  # sampling, not greedy


def test_the_static_steps_distributions_equal_the_cached_forwards():
    """Teacher-forced along the eager greedy tokens: each step's combined log-probabilities (float64 mixture)
    within the rounding bound of the stacked forward with its growing cache."""
    ens, steps = _ensemble(), 16
    x, mask = ens.encode_prompts(PROMPTS, steps)
    out = ens(x, attention_mask=mask, use_cache=True, logits_to_keep=1)
    want, tokens = [], []
    for _ in range(steps):
        want.append(out.logits[:, -1])
        tokens.append(want[-1].argmax(-1, keepdim=True))
        mask = torch.cat([mask, mask.new_ones(len(PROMPTS), 1)], dim=1)
        out = ens(tokens[-1], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    got = _decoder(ens).log_probs_along(x, ens.encode_prompts(PROMPTS, steps)[1], torch.cat(tokens, dim=1))
    assert got.shape == (len(PROMPTS), steps, want[0].shape[-1])
    for step in range(steps):
        bound = rounding_bound(float(want[step].abs().max()), WIDTH, 2 * (step + 1))
        assert float((got[:, step] - want[step]).abs().max()) <= bound, step


def test_lora_adapters_over_a_llama_base_decode_alike(tmp_path):
    from sisaflow.inference.lora_runners import stacked_lora
    from sisaflow.models.pretrained import load_base_model
    from tests.lora_base import save_tiny_base
    from tests.unit.models.test_lora import LPS, _random_adapters

    base = save_tiny_base(tmp_path / "base")
    runner = stacked_lora(load_base_model(str(base)), _random_adapters(base, LPS[1], 3), 2.0, 96)
    ens = Ensemble([], [1.0, 2.0, 3.0], "mixture", IdTokenizer(), runner=runner, context_length=96)
    want = ens.generate(PROMPTS, max_new_tokens=24)
    assert _graph_texts(ens, _decoder(ens), PROMPTS, 24) == want
    assert len(set(",".join(want).split(","))) >= 8


def test_the_step_compiles_as_one_graph_and_decodes_alike(tmp_path):
    """`compile=True` traces the step whole (fullgraph: a break would raise) for stacked from-scratch
    constituents and for LoRA adapters over a base that groups key/value heads; aot_eager runs the traced,
    functionalised graph (inductor's input) without a C++ build, and gives the eager tokens."""
    from sisaflow.inference.lora_runners import stacked_lora
    from sisaflow.models.pretrained import load_base_model
    from tests.lora_base import save_tiny_base
    from tests.unit.models.test_lora import LPS, _random_adapters

    base = save_tiny_base(tmp_path / "base")
    lora = stacked_lora(load_base_model(str(base)), _random_adapters(base, LPS[1], 2), 2.0, 96)
    for ens in (
        _ensemble(),
        Ensemble([], [1.0, 3.0], "mixture", IdTokenizer(), runner=lora, context_length=96),
    ):
        assert isinstance(ens.runner, StackedLlama)
        dec = GraphDecoder(
            ens.runner, ens.weights, "mixture", capture=False, compile=True, compile_backend="aot_eager"
        )
        assert _graph_texts(ens, dec, PROMPTS, 12) == ens.generate(PROMPTS, max_new_tokens=12)


def test_shapes_are_bucketed_reused_cut_and_evicted(monkeypatch):
    ens = _ensemble(context_length=256)
    dec = _decoder(ens)
    assert bucket(3, (1, 2, 4)) == 4 and bucket(9, (1, 2, 4)) == 4
    _graph_texts(ens, dec, PROMPTS, 8)  # 3 rows padded to 4; a prompt of 50 tokens padded to 64
    _graph_texts(ens, dec, PROMPTS[:2], 8)  # 2 rows, 27 tokens: another shape
    _graph_texts(ens, dec, ["Who wrote it, and when?", "Hi"], 8)  # 23 tokens: the same shape again
    assert dec.captured == [(4, 64, 128), (2, 32, 64)]
    monkeypatch.setattr(graphed, "BATCH_BUCKETS", (1, 2))  # 5 prompts: chunks of 2, 2 and 1
    prompts = PROMPTS + ["a", "Who?"]
    assert _graph_texts(ens, dec, prompts, 8) == ens.generate(prompts, max_new_tokens=8)
    assert dec.captured[-2:] == [(2, 64, 128), (1, 64, 128)]
    monkeypatch.setattr(graphed, "MAX_GRAPHS", 2)
    _graph_texts(ens, dec, ["x" * 100], 10)  # a new shape: the least recently used go
    assert dec.captured == [(1, 64, 128), (1, 112, 128)]


def test_a_failed_capture_falls_back_to_the_eager_static_steps(monkeypatch, caplog):
    """A device that cannot capture (or compile) a step still serves: the decoder says why and runs eagerly."""
    ens = _ensemble()
    want = ens.generate(PROMPTS, max_new_tokens=10)
    dec = _decoder(ens)
    dec.capture = True  # as on CUDA; the capture then fails at its first CUDA call

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", refuse)
    assert _graph_texts(ens, dec, PROMPTS, 10) == want
    assert not dec.capture and dec.failure and "stream is capturing" in dec.failure
    assert "CUDA graphs off" in caplog.text
    assert all(not dec._shapes[k].graphs for k in dec.captured)


def test_capture_needs_cuda_and_params_can_turn_graphs_off(make_served, make_records, make_params):
    ens = _ensemble()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            GraphDecoder(ens.runner, ens.weights, "mixture", capture=True)  # type: ignore[arg-type]
    ws = make_served(
        make_records(owners=3, per_owner=2),
        make_params(
            sharding={"shards": 1, "slices": 1}, ensemble={"cuda_graphs": False, "compile_decode": True}
        ),
    )
    served = Ensemble.load(ws)
    assert served.cuda_graphs is False and served.compile_decode is True and served.graph_decoder() is None
    assert Ensemble.load(ws).generate("Hi", max_new_tokens=4) == served.generate("Hi", max_new_tokens=4)


def test_a_mixture_of_one_equals_its_model():
    (model,) = _models(seeds=(1,), tie=False)
    ens = Ensemble([model], [1.0], "mixture", IdTokenizer())
    dec = _decoder(ens)
    x, mask = ens.encode_prompts(PROMPTS[:1], 12)
    got = dec.generate(x, mask, 12, ens.tokenizer.eos_id)[0]
    ids = x
    want = []
    for _ in range(12):
        lp = torch.log_softmax(model(input_ids=ids).logits[:, -1].double(), -1)  # (B, V): S = 1 in front
        token = int(combine_log_probs(lp[None], ens.weights, "mixture")[0].argmax())
        if token == ens.tokenizer.eos_id:
            break
        want.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert got == want


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_the_captured_graph_replays_the_eager_tokens_on_cuda(combine):
    """float32 on CUDA: the captured graph's greedy tokens equal the eager stacked loop's, and `generate` uses it."""
    ens = _ensemble(combine).cuda()
    want = [
        ens.tokenizer.decode(t) for t in ens._generate_eager(*ens.encode_prompts(PROMPTS, 24), 24, 0.0, 0)
    ]
    dec = ens.graph_decoder()
    assert dec is not None and dec.capture and dec is ens.graph_decoder()  # made once
    # the mixture in float64 as the eager path computes it (float32 is the CUDA default: bench/graph_generate.py
    # measures what that changes), so that the comparison is of the captured steps alone
    dec.mixture_dtype = torch.float64
    assert ens.generate(PROMPTS, max_new_tokens=24) == want
    assert dec.captured and all(set(dec._shapes[k].graphs) == {"prefill", "decode"} for k in dec.captured)
    sampled = ens.generate(PROMPTS, max_new_tokens=12, temperature=0.9, seed=3)
    ens.cuda_graphs = False
    assert ens.generate(PROMPTS, max_new_tokens=12, temperature=0.9, seed=3) == sampled
