"""hf: the ensemble behind transformers' `generate()`. Over every runner (stacked, loop, batched LoRA, stacked
LoRA, peft loop): greedy decoding picks what `Ensemble.generate` picks; beam search with the runner's cache picks
what it picks recomputing every step without a cache (so the cache is reordered right); the scores transformers
sees are the ensemble's combined distribution; and a stale ensemble is refused."""

from __future__ import annotations

import math

import pytest
import torch

from sisaflow.core.config import PosteriorParams
from sisaflow.inference.ensemble import Ensemble
from sisaflow.inference.hf import EnsembleForCausalLM
from sisaflow.inference.lora_runners import stacked_lora
from sisaflow.models.pretrained import load_base_model
from tests.unit.inference.test_ensemble import PROMPTS, IdTokenizer, _models
from tests.unit.inference.test_stacked import LAYERS, WIDTH, rounding_bound
from tests.unit.models.test_lora import LPS, _lora_ensembles, _random_adapters, base_dir  # noqa: F401  (fixture)

RUNNERS = ["stacked", "loop", "lora-batched", "lora-loop", "lora-stacked"]


@pytest.fixture(params=[(r, c) for r in RUNNERS for c in ("mixture", "posterior")], ids="-".join)
def ensemble(request, make_params, base_dir) -> Ensemble:  # noqa: F811
    """Every runner, combined as a fixed mixture or by the context (posterior, with a floor: the running scores
    then travel in a RoutedCache around the runner's own cache, whatever that is)."""
    kind, combine = request.param
    ens = _runner_ensemble(kind, make_params, base_dir)
    ens.combine = combine
    ens.posterior = PosteriorParams(floor=0.1)
    return ens


def _runner_ensemble(kind: str, make_params, base_dir) -> Ensemble:  # noqa: F811
    if kind in ("stacked", "loop"):
        return Ensemble(
            _models(make_params), [1.0, 2.0, 3.0], "mixture", IdTokenizer(), batched=kind == "stacked"
        )
    batched, loop = _lora_ensembles(base_dir, LPS[0])
    if kind == "lora-batched":
        return batched
    if kind == "lora-loop":
        return loop
    lean = stacked_lora(load_base_model(str(base_dir)), _random_adapters(base_dir, LPS[0], 3), 2.0, 96)
    return Ensemble([], [1.0, 2.0, 3.0], "mixture", batched.tokenizer, runner=lean, context_length=96)


def test_greedy_generate_picks_what_the_ensemble_picks(ensemble):
    model = EnsembleForCausalLM(ensemble)
    batch = model.encode(PROMPTS, max_new_tokens=12)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # left padding in play
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    texts = model.decode(out, batch["input_ids"].shape[1])
    assert texts == ensemble.generate(PROMPTS, max_new_tokens=12)
    assert len(set(texts)) == len(PROMPTS)  # varied output: the comparison is not vacuous
    # one prompt alone: the same continuation as inside the batch
    alone = model.encode(PROMPTS[0])
    first = model.generate(**alone, max_new_tokens=12, do_sample=False)
    assert model.decode(first, alone["input_ids"].shape[1]) == texts[:1]


def test_beam_search_with_the_runners_cache_equals_recomputing_without_one(ensemble):
    """Beam search reorders the cache every step (`_reorder_cache`); with no cache nothing is reordered."""
    model = EnsembleForCausalLM(ensemble)
    batch = model.encode(PROMPTS[:2])
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False)
    cached = model.generate(**batch, use_cache=True, **kw)
    fresh = model.generate(**batch, use_cache=False, **kw)
    assert cached.shape[0] == 6 and torch.equal(cached, fresh)
    greedy = model.generate(**batch, max_new_tokens=8, do_sample=False)
    # the beams differ from each other, and the best differs from greedy somewhere: reordering mattered
    assert len({tuple(r) for r in cached.tolist()}) == 6
    assert not torch.equal(cached[::3], greedy)


def test_the_scores_transformers_sees_are_the_ensembles_distribution(ensemble):
    model = EnsembleForCausalLM(ensemble)
    batch = model.encode(PROMPTS[:2])
    out = model.generate(
        **batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    width = batch["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        seen = out.sequences[:, : width + step]
        mask = torch.cat([batch["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
        expected = ensemble(seen, attention_mask=mask).logits[:, -1]
        # generate() decodes through the cache, step on step; the reference recomputes the whole prefix: the
        # rounding of a cached decode (rounding_bound over 1 + step chained forwards), plus the cast to float32
        scale = float(expected.abs().max())
        bound = rounding_bound(scale, WIDTH, LAYERS * (1 + step)) + torch.finfo(torch.float32).eps * scale
        assert float((logits.double() - expected).abs().max()) <= bound
        # a distribution: exp of V float32 log-probabilities sums to 1 within V roundings of a float32 sum
        vocab = logits.shape[-1]
        assert (
            float((logits.double().exp().sum(-1) - 1).abs().max()) <= vocab * torch.finfo(torch.float32).eps
        )


def test_sampling_options_act_on_the_ensembles_distribution(make_params):
    ens = Ensemble(_models(make_params), [1.0, 2.0, 3.0], "mixture", IdTokenizer())
    model = EnsembleForCausalLM(ens)
    batch = model.encode(PROMPTS)
    greedy = model.generate(**batch, max_new_tokens=10, do_sample=False)
    torch.manual_seed(0)
    top1 = model.generate(**batch, max_new_tokens=10, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)  # sampling from the single most likely token is greedy
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(
            model.generate(**batch, max_new_tokens=10, do_sample=True, top_p=0.95, num_return_sequences=2)
        )
    assert runs[0].shape[0] == 2 * len(PROMPTS) and torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][::2], greedy)
    penalised = model.generate(**batch, max_new_tokens=10, do_sample=False, repetition_penalty=5.0)
    assert not torch.equal(penalised, greedy)


def test_generation_stops_at_end_of_text_and_respects_max_new_tokens(make_params):
    ens = Ensemble(_models(make_params), [1.0, 1.0, 1.0], "mixture", IdTokenizer())
    model = EnsembleForCausalLM(ens)
    batch = model.encode(["Hi"])
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 6
    assert model.config.eos_token_id == model.config.pad_token_id == ens.tokenizer.eos_id
    assert model.config.vocab_size == ens.tokenizer.vocab_size and model.config.num_constituents == 3
    for unsupported in ({"labels": batch["input_ids"]}, {"output_attentions": True}):
        with pytest.raises(ValueError, match="it has no"):
            model(**batch, **unsupported)
    with pytest.raises(ValueError, match="no output_hidden_states"):
        model.generate(**batch, max_new_tokens=2, output_hidden_states=True, return_dict_in_generate=True)
    # the wrapper holds the ensemble's modules, not copies
    assert {p.data_ptr() for p in model.parameters()} == {p.data_ptr() for p in ens.parameters()}


def test_a_stale_ensemble_is_refused(make_records, make_served, make_params):
    from sisaflow.core.ledger import DeletionRequest, append_request
    from sisaflow.data.sharding import read_slice
    from sisaflow.inference.ensemble import StaleEnsembleError

    ws = make_served(make_records(owners=6, per_owner=2), make_params(sharding={"shards": 2, "slices": 1}))
    model = EnsembleForCausalLM(Ensemble.load(ws))
    batch = model.encode("hello")
    assert model.generate(**batch, max_new_tokens=2).shape[0] == 1
    victim = read_slice(ws, 0, 0)[0]
    append_request(
        ws.ledger_file, DeletionRequest("req-x", [victim.owner], [], content_hashes=[victim.content_hash])
    )
    with pytest.raises(StaleEnsembleError, match="load it again"):
        model.generate(**batch, max_new_tokens=2)


def test_the_cli_decodes_with_transformers_when_asked(make_records, make_served, make_params, capsys):
    from sisaflow import cli

    ws = make_served(make_records(owners=3, per_owner=2), make_params(sharding={"shards": 1, "slices": 1}))
    model = EnsembleForCausalLM(Ensemble.load(ws))
    prompts = ["Question: who?", "Hi"]
    batch = model.encode(prompts, 6)
    width = batch["input_ids"].shape[1]
    run = ["--workspace", str(ws.root), "generate", "--max-new-tokens", "6", *prompts]

    beams = model.decode(model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False), width)
    assert cli.main(run + ["--num-beams", "3"]) == 0
    assert capsys.readouterr().out == "\n\n".join(p + t for p, t in zip(prompts, beams)) + "\n"

    torch.manual_seed(4)
    sampled = model.decode(
        model.generate(**batch, max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9), width
    )
    options = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "4"]
    for _ in range(2):  # the same command, the same output
        assert cli.main(run + options) == 0
        assert capsys.readouterr().out == "\n\n".join(p + t for p, t in zip(prompts, sampled)) + "\n"

    for bad, message in [
        (["--top-k", "5"], "give --temperature above 0"),
        (["--top-p", "1.5", "--temperature", "1"], "--top-p must be in"),
        (["--num-beams", "0"], "--num-beams must be at least 1"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
    ]:
        assert cli.main(run + bad) != 0
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------- transformers tokenizers


TEXTS = ["Question: who?", "Ça va? 日本 🙂", "", "a literal <|endoftext|> stays bytes", "\n\t"]


def test_the_byte_level_tokenizer_gives_the_byte_tokenizers_ids_and_text():
    from sisaflow.inference.hf import ByteLevelTokenizer
    from sisaflow.models.tokenizer import ByteTokenizer

    ours, theirs = ByteTokenizer(), ByteLevelTokenizer()
    assert len(theirs) == ours.vocab_size and theirs.eos_token_id == theirs.pad_token_id == ours.eos_id
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text)
        assert theirs.decode(ids) == text == ours.decode(ids)
    broken = [0xFF, 65, 0xC3, 256, 66]  # invalid UTF-8, end-of-text inside
    assert theirs.decode(broken, skip_special_tokens=True) == "\ufffdA\ufffdB"
    assert theirs.decode(broken) == "\ufffdA\ufffd<|endoftext|>B"
    padded = theirs(["a", "bcd"], padding=True)
    assert padded["input_ids"] == [[256, 256, 97], [98, 99, 100]]
    assert padded["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_a_transformers_pipeline_generates_what_the_ensemble_does(make_params, tokenizer):
    from transformers import pipeline

    from sisaflow.models.scratch import build_model
    from sisaflow.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    params = make_params(model={"tie_embeddings": False, "tokenizer": tokenizer})
    models = []
    for seed in (1, 2):
        m = build_model(params.model, tok.vocab_size, tok.eos_id, seed)
        with torch.no_grad():
            for w in m.parameters():
                if w.dim() == 2:
                    w.normal_(0, 2.0 / w.shape[1] ** 0.5, generator=torch.Generator().manual_seed(seed))
        models.append(m.eval())
    ens = Ensemble(models, [1.0, 3.0], "mixture", tok)
    model = EnsembleForCausalLM(ens)
    prompts = ["Question: who wrote it?", "Hi"]
    expected = ens.generate(prompts, max_new_tokens=8)
    generator = pipeline("text-generation", model=model, tokenizer=model.hf_tokenizer())
    got = generator(prompts, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert [g[0]["generated_text"] for g in got] == expected
    assert len(set(expected)) == 2 and all(expected)


def test_generation_stops_at_a_stop_string(make_params):
    """transformers' stop strings match token by token; the byte tokenizer's tokens are bytes, so an ASCII
    stop string (the first pair of printable characters of the greedy output) stops right after itself."""
    ens = Ensemble(_models(make_params), [1.0, 2.0, 3.0], "mixture", load_byte())
    model = EnsembleForCausalLM(ens)
    batch = model.encode("Question: what is 2 plus 2?")
    width = batch["input_ids"].shape[1]
    full = model.decode(model.generate(**batch, max_new_tokens=40, do_sample=False), width)[0]
    end = next(
        i + 2 for i in range(len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isprintable()
    )
    stop = full[end - 2 : end]
    assert end < len(full) and stop not in full[: end - 1]
    out = model.generate(
        **batch, max_new_tokens=40, do_sample=False, stop_strings=[stop], tokenizer=model.hf_tokenizer()
    )
    assert model.decode(out, width)[0] == full[:end]


def load_byte():
    from sisaflow.models.tokenizer import load_tokenizer

    return load_tokenizer("byte")


# ------------------------------------------------------------------------------- an evaluation harness


@pytest.mark.parametrize("combine", ["mixture", "posterior"])
def test_lm_evaluation_harness_scores_and_generates_with_the_ensemble_unchanged(make_params, combine):
    """EleutherAI's lm-evaluation-harness takes the model as any transformers causal LM (`HFLM(pretrained=
    model, tokenizer=...)`): its log-likelihoods are the ensemble's, its generations `Ensemble.generate`'s."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ens = Ensemble(_models(make_params), [1.0, 2.0, 3.0], combine, load_byte())
    model = EnsembleForCausalLM(ens)
    lm = HFLM(pretrained=model, tokenizer=model.hf_tokenizer(), batch_size=3)
    pairs = [("Question: who?\nAnswer:", " Ada"), ("Q", "uestion"), ("Hi", " there, Ça va?")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (ll, _greedy) in zip(pairs, got):
        ids = ens.tokenizer.encode(context + continuation)
        lp = ens(torch.tensor([ids])).logits[0]
        start = len(ens.tokenizer.encode(context))
        want = sum(float(lp[t - 1, ids[t]]) for t in range(start, len(ids)))
        # lm-eval re-normalises the float32 log-probabilities it is handed and sums them: per token a float32
        # log_softmax's rounding, (log2 V + 4) eps32 of (|log p| + log V)
        n, eps = len(ids) - start, torch.finfo(torch.float32).eps
        vocab = ens.tokenizer.vocab_size
        assert ll == pytest.approx(want, abs=n * (math.log2(vocab) + 4) * eps * (abs(want) + math.log(vocab)))
    prompts = PROMPTS[:2]
    requests = [
        Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}), i)
        for i, p in enumerate(prompts)
    ]
    expected = [t.split("\n")[0] for t in ens.generate(prompts, max_new_tokens=10)]
    assert all(expected) and len(set(expected)) == 2
    assert lm.generate_until(requests) == expected
