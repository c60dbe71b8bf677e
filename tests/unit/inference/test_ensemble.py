"""ensemble: the combined distribution is the weighted mixture (or normalised product) of the constituents',
scoring matches a direct computation, and cached generation matches recomputing the whole sequence."""

from __future__ import annotations

import math

import pytest
import torch

from sisaflow.core.errors import WorkspaceError
from sisaflow.inference.combine import combine_log_probs
from sisaflow.inference.ensemble import Ensemble
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import ByteTokenizer, load_tokenizer

# ------------------------------------------------------------------------------------------ combine_log_probs


def _random_log_probs(s=3, shape=(2, 5), vocab=11, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(s, *shape, vocab, generator=g, dtype=torch.float64) * 3, dim=-1)


def test_mixture_equals_log_of_weighted_sum_of_probabilities():
    lp = _random_log_probs()
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    out = combine_log_probs(lp, w, "mixture")
    assert out.shape == lp.shape[1:]
    direct = torch.log(sum(w[i] * torch.softmax(lp[i], dim=-1) for i in range(3)))
    torch.testing.assert_close(out, direct, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_mixture_with_one_constituent_or_zero_weight():
    lp = _random_log_probs()
    torch.testing.assert_close(
        combine_log_probs(lp[:1], torch.tensor([1.0]), "mixture"), lp[0], rtol=0, atol=1e-12
    )
    out = combine_log_probs(lp, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), "mixture")
    torch.testing.assert_close(out, lp[1], rtol=0, atol=1e-12)


def test_mixture_known_answer():
    p1 = torch.tensor([0.5, 0.5, 0.0 + 1e-300], dtype=torch.float64)
    p2 = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    lp = torch.stack([p1.log(), p2.log()])
    out = combine_log_probs(lp, torch.tensor([0.75, 0.25], dtype=torch.float64), "mixture")
    torch.testing.assert_close(
        out.exp(), torch.tensor([0.4, 0.425, 0.175], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_product_normalises_and_equals_weighted_geometric_mean():
    lp = _random_log_probs(seed=1)
    w = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
    out = combine_log_probs(lp, w, "product")
    torch.testing.assert_close(
        torch.logsumexp(out, -1), torch.zeros(2, 5, dtype=torch.float64), rtol=0, atol=1e-12
    )
    p = lp.exp()
    q = p[0] ** w[0] * p[1] ** w[1] * p[2] ** w[2]
    torch.testing.assert_close(out, torch.log(q / q.sum(-1, keepdim=True)), rtol=0, atol=1e-10)
    # the product of identical distributions is that distribution
    same = torch.stack([lp[0], lp[0], lp[0]])
    torch.testing.assert_close(combine_log_probs(same, w, "product"), lp[0], rtol=0, atol=1e-12)


def test_mixture_and_product_differ_and_unknown_mode_fails():
    lp = _random_log_probs(seed=2)
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert not torch.allclose(combine_log_probs(lp, w, "mixture"), combine_log_probs(lp, w, "product"))
    with pytest.raises(ValueError, match="mixture or product"):
        combine_log_probs(lp, w, "median")


# ---------------------------------------------------------------------------------------------------- Ensemble


class IdTokenizer(ByteTokenizer):
    """The byte tokenizer, but decode shows the token ids, so generations compare exactly."""

    def decode(self, ids: list[int]) -> str:
        return ",".join(map(str, ids))


def _models(make_params, seeds=(1, 2, 3), scale=2.0):
    """Tiny random Llamas whose next token depends on the whole context.

    The default init (std 0.02, tied embeddings) just echoes the last token, which would let a broken KV cache
    go unnoticed; weights of std scale/sqrt(fan_in) and an untied head give varied, context-dependent output."""
    tok = load_tokenizer("byte")
    params = make_params(model={"tie_embeddings": False})
    models = []
    for s in seeds:
        m = build_model(params.model, tok.vocab_size, tok.eos_id, s)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for w in m.parameters():
                if w.dim() == 2:
                    w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)
        models.append(m.eval())
    return models


@pytest.fixture
def models(make_params):
    return _models(make_params)


@pytest.fixture
def models64(make_params):
    """The same models in float64: an ensemble's stacked forward and the models' own forward sum in other orders,
    which float32 shows at ~3e-6 (seen on a clean clone) and float64 at ~1e-13, so a comparison of the two
    paths bounds only the combination's arithmetic, at 1e-9."""
    return [m.double() for m in _models(make_params)]


def _direct_log_probs(models, weights, ids: list[int], combine="mixture") -> torch.Tensor:
    """Per position, the combined next-token log-probabilities, computed straight from each model's logits."""
    x = torch.tensor([ids])
    with torch.no_grad():
        probs = [torch.softmax(m(input_ids=x).logits[0].double(), dim=-1) for m in models]
    w = [wi / sum(weights) for wi in weights]
    if combine == "mixture":
        return torch.log(sum(wi * p for wi, p in zip(w, probs)))
    q = math.prod(p**wi for wi, p in zip(w, probs))
    return torch.log(q / q.sum(-1, keepdim=True))


def test_weights_are_normalised_uniform_or_by_size(models64):
    models = models64
    tok = load_tokenizer("byte")
    uniform = Ensemble(models, [1.0, 1.0, 1.0], "mixture", tok)
    sized = Ensemble(models, [30, 10, 60], "mixture", tok)
    torch.testing.assert_close(uniform.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(sized.weights, torch.tensor([0.3, 0.1, 0.6], dtype=torch.float64))
    x = torch.tensor([list(b"hello")])
    a, b = uniform(x).logits, sized(x).logits
    assert not torch.allclose(a, b)
    ids = list(b"hello")
    torch.testing.assert_close(b[0], _direct_log_probs(models, [30, 10, 60], ids), rtol=0, atol=1e-9)
    torch.testing.assert_close(a[0], _direct_log_probs(models, [1, 1, 1], ids), rtol=0, atol=1e-9)


def test_empty_ensemble_is_refused():
    with pytest.raises(WorkspaceError):
        Ensemble([], [], "mixture", load_tokenizer("byte"))


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_score_equals_direct_per_token_computation(models64, combine):
    models = models64
    tok = load_tokenizer("byte")
    ens = Ensemble(models, [2.0, 1.0, 1.0], combine, tok)
    text = "Question: who? Answer: Ada ✓"
    ids = tok.encode(text) + [tok.eos_id]
    lp = _direct_log_probs(models, [2.0, 1.0, 1.0], ids, combine)
    ll = sum(float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1))
    out = ens.score(text)
    assert out["tokens"] == len(ids) - 1 == len(text.encode())
    assert out["log_likelihood"] == pytest.approx(ll, rel=1e-9, abs=1e-9)
    assert out["perplexity"] == pytest.approx(math.exp(-ll / (len(ids) - 1)), rel=1e-9)
    assert out["log_likelihood"] < 0


def test_score_of_single_model_ensemble_equals_model_loss(models):
    tok = load_tokenizer("byte")
    ens = Ensemble(models[:1], [1.0], "mixture", tok)
    ids = torch.tensor([tok.encode("abc def") + [tok.eos_id]])
    with torch.no_grad():
        loss = float(models[0](input_ids=ids, labels=ids).loss)
    out = ens.score("abc def")
    assert out["log_likelihood"] == pytest.approx(-loss * (ids.shape[1] - 1), rel=1e-5)


def test_score_truncates_to_the_context_and_rejects_nothing_to_score(models):
    tok = load_tokenizer("byte")
    ens = Ensemble(models, [1, 1, 1], "mixture", tok)
    assert ens.score("y" * 500)["tokens"] == 96 - 1
    with pytest.raises(ValueError):
        ens.score("")  # only end-of-text: nothing to predict


def _greedy_without_cache(ens, prompt_ids, max_new):
    ids, new = list(prompt_ids), []
    gaps = []
    for _ in range(max_new):
        lp = ens(torch.tensor([ids])).logits[0, -1]
        top2 = torch.topk(lp, 2).values
        gaps.append(float(top2[0] - top2[1]))
        token = int(lp.argmax())
        if token == ens.tokenizer.eos_id:
            break
        new.append(token)
        ids.append(token)
    return new, gaps


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_greedy_generation_with_cache_equals_recomputing_without(models, combine):
    ens = Ensemble(models, [1.0, 2.0, 3.0], combine, IdTokenizer())
    prompt = "Question: what is 2 plus 2?"
    expected, gaps = _greedy_without_cache(ens, list(prompt.encode()), 25)
    assert len(expected) >= 20 and len(set(expected)) >= 8, "the test models must give varied output"
    assert min(gaps) > 1e-5, "a near tie would make the comparison meaningless"
    got = ens.generate(prompt, max_new_tokens=25, temperature=0.0)
    assert got == ",".join(map(str, expected))


def test_a_prompt_longer_than_the_room_keeps_its_end(models):
    # context 96: a 90-token prompt with 40 new tokens keeps the prompt's last 56 tokens
    ens = Ensemble(models, [1, 1, 1], "mixture", IdTokenizer())
    prompt = "".join(chr(ord("a") + i % 26) for i in range(90))
    expected, _ = _greedy_without_cache(ens, list(prompt.encode())[-56:], 40)
    got = ens.generate(prompt, max_new_tokens=40)
    assert got == ",".join(map(str, expected))


def _sample_without_cache(ens, prompt_ids, max_new, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    ids, new = list(prompt_ids), []
    for _ in range(max_new):
        lp = ens(torch.tensor([ids])).logits[0, -1]
        probs = torch.softmax(lp / temperature, dim=-1).float()
        token = int(torch.multinomial(probs, 1, generator=gen))
        if token == ens.tokenizer.eos_id:
            break
        new.append(token)
        ids.append(token)
    return new


def test_sampling_with_a_fixed_seed_is_reproducible(make_params):
    models = _models(make_params, scale=1.0)  # a spread-out distribution so samples vary
    ens = Ensemble(models, [1, 1, 1], "mixture", IdTokenizer())
    a = ens.generate("Hello", max_new_tokens=30, temperature=1.0, seed=7)
    b = ens.generate("Hello", max_new_tokens=30, temperature=1.0, seed=7)
    c = ens.generate("Hello", max_new_tokens=30, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    torch.manual_seed(12345)  # the global RNG plays no part
    assert ens.generate("Hello", max_new_tokens=30, temperature=1.0, seed=7) == a
    expected = _sample_without_cache(ens, list(b"Hello"), 30, 1.0, 7)
    assert a == ",".join(map(str, expected))
    # near-zero temperature sampling is greedy
    greedy, _ = _greedy_without_cache(ens, list(b"Hello"), 10)
    assert ens.generate("Hello", max_new_tokens=10, temperature=1e-4, seed=3) == ",".join(map(str, greedy))


PROMPTS = ["Question: what is 2 plus 2?", "Hi", "", "The author of the book was born in"]


def assert_a_batch_generates_what_each_prompt_alone_does(ens, prompts=PROMPTS, new=20) -> None:
    """A left-padded batch generates what each prompt does alone, greedy or sampled (shared with the LoRA
    tests)."""
    alone = [ens.generate(p, max_new_tokens=new) for p in prompts]
    assert len({len(p) for p in prompts}) > 1 and len(set(alone)) == len(prompts)  # padding, varied output
    assert ens.generate(prompts, max_new_tokens=new) == alone
    assert ens.generate(prompts[:1], max_new_tokens=new) == alone[:1] and ens.generate([]) == []
    sampled = ens.generate(prompts, max_new_tokens=new, temperature=1.0, seed=3)
    assert sampled == [ens.generate(p, max_new_tokens=new, temperature=1.0, seed=3) for p in prompts]
    assert sampled != alone


@pytest.mark.parametrize("batched", [True, False], ids=["stacked", "loop"])
def test_a_batch_of_prompts_generates_what_each_alone_does(models, batched):
    ens = Ensemble(models, [1.0, 2.0, 3.0], "mixture", IdTokenizer(), batched=batched)
    assert ens.batched is batched
    assert_a_batch_generates_what_each_prompt_alone_does(ens)


def test_empty_prompt_starts_from_end_of_text(models):
    ens = Ensemble(models, [1, 1, 1], "mixture", IdTokenizer())
    expected, _ = _greedy_without_cache(ens, [256], 5)
    assert ens.generate("", max_new_tokens=5) == ",".join(map(str, expected))


def test_generate_decodes_with_the_tokenizer(models):
    ens = Ensemble(models, [1, 1, 1], "mixture", load_tokenizer("byte"))
    ids_ens = Ensemble(models, [1, 1, 1], "mixture", IdTokenizer())
    ids = ids_ens.generate("Hi", max_new_tokens=8)
    expected = ByteTokenizer().decode([int(i) for i in ids.split(",") if i])
    assert ens.generate("Hi", max_new_tokens=8) == expected


# ----------------------------------------------------------------------------------- loading from the registry


@pytest.mark.parametrize("weights", ["uniform", "size"])
def test_load_from_registry_serves_the_trained_constituents(
    make_records, make_workspace, make_params, weights
):
    from sisaflow.data.sharding import read_shard_manifest
    from sisaflow.inference.registry import build_registry
    from sisaflow.training.checkpoint import load_weights
    from sisaflow.training.loop import train_shard

    params = make_params(sharding={"shards": 2, "slices": 1}, ensemble={"weights": weights})
    ws = make_workspace(make_records(owners=6, per_owner=2), shards=2, slices=1)
    for shard in (0, 1):
        train_shard(ws, shard, params, progress=lambda m: None)
    reg = build_registry(ws, params)
    assert build_registry(ws, params)["version"] == reg["version"]
    sizes = [read_shard_manifest(ws, s)["records"] for s in (0, 1)]
    assert sizes[0] != sizes[1], "equal shard sizes would make 'size' weights look uniform"

    ens = Ensemble.load(ws)
    assert ens.version == reg["version"] and ens.shards == [0, 1]
    expected_w = [n / sum(sizes) for n in sizes] if weights == "size" else [0.5, 0.5]
    torch.testing.assert_close(ens.weights, torch.tensor(expected_w, dtype=torch.float64))

    tok = load_tokenizer("byte")
    direct_models = []
    for shard in (0, 1):
        m = build_model(params.model, tok.vocab_size, tok.eos_id, 123)
        load_weights(ws.checkpoint_dir(shard, 0), m)
        direct_models.append(m.eval())
        for a, b in zip(m.parameters(), ens.constituents[shard].parameters()):
            assert torch.equal(a, b)
    text = "Question: what is 1 plus 1?"
    ids = tok.encode(text) + [tok.eos_id]
    # in float64 both ways: the stacked forward and the models' own sum in other orders (float32 rounding would
    # show at ~1e-6 relative, float64 at ~1e-14), so 1e-9 bounds the combination and the weights alone
    lp = _direct_log_probs([m.double() for m in direct_models], expected_w, ids)
    ll = sum(float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1))
    assert Ensemble.load(ws, dtype=torch.float64).score(text)["log_likelihood"] == pytest.approx(ll, rel=1e-9)


def test_a_loaded_ensemble_refuses_once_a_request_excludes_one_of_its_constituents(
    make_records, make_served, make_params
):
    """A long-lived process holding an Ensemble must not go on serving a constituent that a deletion request
    recorded since excludes: score and generate refuse until it loads again. A ledger change that excludes
    nothing it serves does not stop it."""
    from sisaflow.core.ledger import DeletionRequest, append_request
    from sisaflow.data.sharding import read_slice
    from sisaflow.inference.ensemble import StaleEnsembleError

    ws = make_served(make_records(owners=6, per_owner=2), make_params(sharding={"shards": 2, "slices": 1}))
    ens = Ensemble.load(ws)
    assert ens.shards == [0, 1] and ens.score("hello")["tokens"] > 0

    append_request(ws.ledger_file, DeletionRequest("req-none", ["nobody"], [], content_hashes=["0" * 64]))
    assert ens.generate("hello", max_new_tokens=2) is not None  # nothing it serves is excluded

    victim = read_slice(ws, 0, 0)[0]
    append_request(
        ws.ledger_file, DeletionRequest("req-x", [victim.owner], [], content_hashes=[victim.content_hash])
    )
    with pytest.raises(StaleEnsembleError, match="load it again"):
        ens.score("hello")
    with pytest.raises(StaleEnsembleError):
        ens.generate("hello")
    assert Ensemble.load(ws).shards == [1]
    assert Ensemble.load(ws, respect_requests=False).shards == [0, 1]


def test_the_cli_generates_for_several_prompts_and_a_prompts_file(
    make_records, make_served, make_params, tmp_path, capsys
):
    from sisaflow import cli

    ws = make_served(make_records(owners=3, per_owner=2), make_params(sharding={"shards": 1, "slices": 1}))
    ens = Ensemble.load(ws)
    prompts = ["Question: who?", "Hi", "Ça va?\nOui"]
    alone = [p + ens.generate(p, max_new_tokens=6) for p in prompts]
    run = ["--workspace", str(ws.root), "generate", "--max-new-tokens", "6"]

    assert cli.main(run + ["Question: who?"]) == 0
    assert capsys.readouterr().out == alone[0] + "\n"  # one prompt: as before
    assert cli.main(run + ["--batch-size", "2", "Question: who?", "Hi", "Ça va?\\nOui"]) == 0
    assert capsys.readouterr().out == "\n\n".join(alone) + "\n"  # batches of 2 and 1, blank lines between
    listed = tmp_path / "prompts.txt"
    listed.write_text("Question: who?\n\nHi\nÇa va?\\nOui\n", encoding="utf-8")
    assert cli.main(run + ["--prompts-file", str(listed)]) == 0
    assert capsys.readouterr().out == "\n\n".join(alone) + "\n"

    half = Ensemble.load(ws, dtype=torch.bfloat16)
    assert {p.dtype for p in half.runner.parameters()} == {torch.bfloat16}
    assert half.weights.dtype == torch.float64 and torch.equal(half.weights, ens.weights)
    for e in (ens, half):  # cast before stacking, so the constituents stay views of the stack: one copy
        assert {p.untyped_storage().data_ptr() for p in e.parameters()} == {
            p.untyped_storage().data_ptr() for p in e.runner.parameters()
        }
    assert cli.main(run + ["--dtype", "bfloat16", "Hi"]) == 0
    assert capsys.readouterr().out == "Hi" + half.generate("Hi", max_new_tokens=6) + "\n"
    assert half.score("Question: who?")["log_likelihood"] == pytest.approx(
        ens.score("Question: who?")["log_likelihood"], rel=0.02
    )

    for bad, message in [
        (["--device", "gpu0", "Hi"], "--device 'gpu0': not a torch device"),
        *(
            [(["--device", "cuda", "Hi"], "torch sees no CUDA device")]
            if not torch.cuda.is_available()
            else []
        ),
        ([], "needs a prompt"),
        (["--prompts-file", str(tmp_path / "missing.txt")], "missing.txt: no such prompts file"),
        (["--batch-size", "0", "Hi"], "--batch-size must be at least 1"),
    ]:
        assert cli.main(run + bad) == 1
        assert message in capsys.readouterr().err
    listed.write_bytes(b"ok\n\xff\n")
    assert cli.main(run + ["--prompts-file", str(listed)]) == 1
    assert "prompts.txt: not UTF-8 text (byte 3)" in capsys.readouterr().err
