"""A bad pretrained base is refused with a message naming the setting and the value, before anything is written.

Each case: `check_base` (what `train_shard`, the pipeline's train step and `sisaflow init --base` call) refuses
without loading weights, and training a sharded workspace with it leaves the workspace as it was (no model
directory, no checkpoint, no registry). A base that changed under served adapters is refused by serving, naming
both content hashes. The bases are tiny and built here (tests/lora_base.py); nothing is downloaded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sisaflow.core.base_files import base_identity
from sisaflow.core.config import Params
from sisaflow.core.errors import ConfigError, WorkspaceError
from sisaflow.models.pretrained import check_base, load_base_model
from sisaflow.pipeline import steps
from sisaflow.training.loop import train_shard
from tests.lora_base import save_tiny_base, save_tiny_gguf, save_tokenizer

TINY_LINEAR = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture
def lora_params(make_params, base_dir):
    """make(base=..., **model settings) -> tiny LoRA params over `base` (the tiny Llama unless given)."""

    def make(base: Path | str | None = None, **model) -> Params:
        return make_params(model={"tokenizer": "base", "base": str(base or base_dir), **model})

    return make


@pytest.fixture
def workspace(make_workspace, make_records):
    return make_workspace(make_records(owners=4, per_owner=2), shards=1, slices=2)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused_everywhere(ws, params: Params, *patterns: str) -> str:
    """check_base, train_shard and the pipeline's train step (the Ray path too) all raise ConfigError matching
    every pattern, and the workspace is unchanged: no models/ directory, no registry. A whole run (`sisaflow run`'s
    sequence) is refused before it imports or shards anything. Returns the message."""
    import yaml

    from sisaflow.pipeline import sequence

    ws.params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    before = _tree(ws.root)
    with pytest.raises(ConfigError) as info:
        check_base(params.model)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    for attempt in (
        lambda: train_shard(ws, 0, params, progress=quiet),
        lambda: steps.train(ws, params, [0], progress=quiet, in_process=True),
        lambda: steps.train(ws, params, [0], progress=quiet),  # refused in this process, before Ray starts
        lambda: sequence.run_steps(str(ws.root), "run", in_process=True),
    ):
        with pytest.raises(ConfigError) as again:
            attempt()
        assert str(again.value) == message
    assert not ws.models_dir.exists() and not ws.registry_dir.exists()
    assert _tree(ws.root) == before
    return message


def test_a_good_base_passes_without_loading_its_weights(lora_params, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("check_base loaded the weights")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    check_base(lora_params().model)
    check_base(lora_params(lora={"target_modules": ["self_attn.q_proj", "down_proj", "lm_head"]}).model)
    check_base(Params().model)  # no base: nothing to check


def test_a_base_that_does_not_exist(workspace, lora_params, tmp_path):
    missing = tmp_path / "no-such-base"
    message = _refused_everywhere(
        workspace, lora_params(missing), r"model\.base = ", re.escape(repr(str(missing))), "no such"
    )
    assert str(missing) in message


def _bert_dir(directory: Path) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=257,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["BertModel"],
    )
    BertModel(config).save_pretrained(str(directory))  # weights and a tokenizer: only its kind is wrong
    save_tokenizer(directory)
    return directory


def _copy_without(base_dir: Path, directory: Path, *names: str) -> Path:
    shutil.copytree(base_dir, directory)
    for name in names:
        (directory / name).unlink()
    return directory


@pytest.mark.parametrize(
    "kind, patterns",
    [
        (
            "bert",
            [
                r"is not a causal language model \(its config\.json says model_type 'bert', architectures "
                r"\['BertModel'\]\); give a causal",
            ],
        ),
        ("bad-json", [r"config\.json is not a readable model config \(OSError.*not a valid JSON"]),
        ("no-model-type", [r"config\.json is not a readable model config"]),
        ("no-weights", [r"has a config\.json but no weights \(no \*\.safetensors or \*\.bin file\)"]),
        ("no-tokenizer", [r"has no tokenizer files"]),
        ("text-file", [r"is a file but not a \.gguf"]),
        ("bad-gguf", [r"is not a readable GGUF file"]),
        ("empty-dir", [r"has neither config\.json .* nor a \.gguf file"]),
    ],
)
def test_a_base_that_is_not_a_causal_lm(workspace, lora_params, base_dir, tmp_path, kind, patterns):
    path = tmp_path / kind
    if kind == "bert":
        _bert_dir(path)
    elif kind == "bad-json":
        _copy_without(base_dir, path)
        (path / "config.json").write_text("{not json")
    elif kind == "no-model-type":
        _copy_without(base_dir, path)
        (path / "config.json").write_text('{"hidden_size": 32}')
    elif kind == "no-weights":
        _copy_without(base_dir, path, "model.safetensors")
    elif kind == "no-tokenizer":
        _copy_without(base_dir, path, "tokenizer.json", "tokenizer_config.json")
    elif kind == "text-file":
        path = tmp_path / "notes.txt"
        path.write_text("not a model")
    elif kind == "bad-gguf":
        path = tmp_path / "broken.gguf"
        path.write_bytes(b"GGUF and then nothing useful")
    else:
        path.mkdir()
    message = _refused_everywhere(
        workspace, lora_params(path), r"^params: model\.base = " + re.escape(repr(str(path))), *patterns
    )
    if kind == "bert":
        assert str(path) in message and "ForCausalLM" in message


def test_a_context_longer_than_the_base_allows_is_refused_before_loading(workspace, lora_params, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the base was loaded before its context length was checked")

    monkeypatch.setattr("sisaflow.models.lora.load_base_model", no_loading)
    params = lora_params(context_length=512)
    _refused_everywhere(
        workspace,
        params,
        r"^params: model\.context_length = 512 is not allowed with model\.base = ",
        r"<= 256 \(the base's max_position_embeddings\)",
    )


@pytest.mark.parametrize(
    "targets, problem",
    [
        (["q_proj", "qkv_proj"], r"'qkv_proj' names no layer of it"),
        (["proj"], r"'proj' names no layer of it"),  # peft matches whole dotted parts: q_proj is not .proj
        (["mlp"], r"'mlp' names model\.layers\.0\.mlp, a LlamaMLP, not a linear layer"),
    ],
)
def test_a_target_module_the_base_lacks(workspace, lora_params, base_dir, monkeypatch, targets, problem):
    from sisaflow.models.lora import attach_adapters

    params = lora_params(lora={"target_modules": targets})
    # the same message from the loaded model, where serving attaches adapters
    with pytest.raises(ConfigError) as loaded:
        attach_adapters(load_base_model(str(base_dir)), params.model.lora, ["default"], seed=0)

    def no_loading(*args, **kwargs):
        raise AssertionError("the base was loaded before its target modules were checked")

    monkeypatch.setattr("sisaflow.models.lora.load_base_model", no_loading)
    message = _refused_everywhere(
        workspace,
        params,
        r"^params: model\.lora\.target_modules = " + re.escape(repr(targets)),
        problem,
        "Its linear layers, which can be targeted: " + TINY_LINEAR + "$",
    )
    assert str(loaded.value) == message.replace(f"the base in {base_dir.resolve()}", "the base")


def test_a_gguf_base_is_checked_from_its_metadata(workspace, lora_params, tmp_path):
    gguf = save_tiny_gguf(tmp_path / "tiny.gguf")
    check_base(lora_params(gguf, lora={"target_modules": ["q_proj", "gate_proj"]}).model)
    _refused_everywhere(
        workspace, lora_params(gguf, context_length=512), r"model\.context_length = 512", "<= 256"
    )
    _refused_everywhere(
        workspace,
        lora_params(gguf, lora={"target_modules": ["c_attn"]}),
        r"'c_attn' names no layer",
        TINY_LINEAR,
    )


def test_serving_refuses_a_base_that_changed_since_the_adapters_were_trained(
    make_served, make_records, make_params, base_dir, tmp_path
):
    from sisaflow.inference.ensemble import Ensemble

    own = shutil.copytree(base_dir, tmp_path / "own-base")
    params = make_params(
        model={"tokenizer": "base", "base": str(own), "lora": {"r": 2, "target_modules": ["q_proj"]}},
        sharding={"shards": 1, "slices": 1},
    )
    ws = make_served(make_records(owners=2, per_owner=2), params)
    Ensemble.load(ws)  # served as trained
    trained = base_identity(str(own))

    other = save_tiny_base(tmp_path / "other-base", seed=7)
    shutil.copyfile(other / "model.safetensors", own / "model.safetensors")  # new weights, same file name
    now = base_identity(str(own))
    assert now != trained
    check_base(params.model)  # still a fine base: only serving these adapters over it is wrong
    before = _tree(ws.root)
    with pytest.raises(WorkspaceError) as info:
        Ensemble.load(ws)
    message = str(info.value)
    assert message.startswith(f"params: model.base = {str(own)!r}: the base model is not the one")
    assert f"its content hash is now {now[:12]}, the registry's base_sha256 is {trained[:12]}" in message
    assert "run `sisaflow run` to retrain" in message
    assert _tree(ws.root) == before  # serving wrote nothing, the registry included
