"""config: params.yaml loads into validated dataclasses; every error names the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sisaflow.core.config import (
    CorpusParams,
    EnsembleParams,
    ModelParams,
    Params,
    ShardingParams,
    TrainParams,
)
from sisaflow.core.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"


def test_defaults_load():
    p = Params.from_dict({})
    assert p == Params()
    assert p.sharding.shards == 4 and p.sharding.slices == 4
    assert p.sharding.shard_ids == [0, 1, 2, 3]
    assert p.train.schedule == "incremental"
    assert p.model.tokenizer == "byte"
    assert p.ensemble == EnsembleParams("uniform", "mixture")
    assert Params.from_dict(None) == Params()


def test_repo_params_yaml_loads_with_its_values():
    p = Params.load(REPO_PARAMS)
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    assert p.corpus.owner_field == raw["corpus"]["owner_field"]
    assert p.sharding.shards == raw["sharding"]["shards"]
    assert p.model.hidden_size == raw["model"]["hidden_size"]
    assert p.train.learning_rate == pytest.approx(raw["train"]["learning_rate"])
    assert isinstance(p.train.learning_rate, float)
    assert p.corpus.text_field is None
    assert p.model.hidden_size % p.model.heads == 0
    # to_dict round-trips
    assert Params.from_dict(p.to_dict()) == p


def _write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_invalid_choice_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"train": {"schedule": "weekly"}})
    msg = str(e.value)
    assert "train.schedule" in msg and "weekly" in msg
    assert "incremental" in msg and "cumulative" in msg
    # the same through a file
    with pytest.raises(ConfigError) as e:
        Params.load(_write(tmp_path, {"train": {"schedule": "weekly"}}))
    assert "train.schedule" in str(e.value) and "incremental" in str(e.value) and "cumulative" in str(e.value)


@pytest.mark.parametrize(
    "section,key,value,allowed",
    [
        ("ensemble", "combine", "median", ("mixture", "product")),
        ("ensemble", "weights", "random", ("uniform", "size")),
        ("model", "tokenizer", "bpe", ("gpt2", "byte")),
        ("corpus", "format", "xml", ("jsonl", "parquet", "csv", "txt")),
        ("train", "device", "tpu", ("auto", "cpu", "cuda")),
    ],
)
def test_other_invalid_choices(section, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        Params.from_dict({section: {key: value}})
    msg = str(e.value)
    assert f"{section}.{key}" in msg
    for a in allowed:
        assert a in msg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"train": {"epochs": 3}})
    msg = str(e.value)
    assert "epochs" in msg and "train" in msg
    assert "epochs_per_slice" in msg  # the allowed keys are listed


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        Params.load(_write(tmp_path, {"trian": {"seed": 1}}))
    assert "trian" in str(e.value)


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "batch_size", "16"),
        ("train", "batch_size", 16.5),
        ("train", "batch_size", True),
        ("train", "learning_rate", "fast"),
        ("model", "tie_embeddings", "yes"),
        ("corpus", "skip_invalid", "yes"),
        ("sharding", "shards", [4]),
        ("dvc", "remote", {"url": "x"}),
    ],
)
def test_wrong_type_is_named(section, key, value):
    with pytest.raises(ConfigError) as e:
        Params.from_dict({section: {key: value}})
    assert f"{section}.{key}" in str(e.value)


def test_int_accepted_where_float_expected():
    p = Params.from_dict({"train": {"learning_rate": 1}})
    assert p.train.learning_rate == 1.0 and isinstance(p.train.learning_rate, float)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"train": [1, 2]})
    assert "train" in str(e.value)


@pytest.mark.parametrize("shards", [0, -1])
def test_non_positive_shards(shards):
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"sharding": {"shards": shards}})
    assert "sharding.shards" in str(e.value) and "> 0" in str(e.value)
    with pytest.raises(ConfigError):
        ShardingParams(shards=shards)


def test_non_positive_slices_and_too_many_shards():
    with pytest.raises(ConfigError, match=r"sharding\.slices"):
        Params.from_dict({"sharding": {"slices": 0}})
    with pytest.raises(ConfigError, match=r"sharding\.shards"):
        Params.from_dict({"sharding": {"shards": 257}})
    assert Params.from_dict({"sharding": {"shards": 256}}).sharding.shards == 256


def test_hidden_size_not_divisible_by_heads():
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"model": {"hidden_size": 130, "heads": 4}})
    msg = str(e.value)
    assert "model.hidden_size" in msg and "model.heads" in msg and "130" in msg
    with pytest.raises(ConfigError):
        ModelParams(hidden_size=30, heads=4)
    assert ModelParams(hidden_size=32, heads=4).hidden_size == 32


def test_zero_allowed_only_where_it_means_off():
    p = Params.from_dict({"train": {"warmup_steps": 0, "weight_decay": 0, "grad_clip": 0}})
    assert p.train.warmup_steps == 0 and p.train.grad_clip == 0.0
    for key in ("batch_size", "epochs_per_slice", "learning_rate", "threads"):
        with pytest.raises(ConfigError, match=rf"train\.{key}"):
            Params.from_dict({"train": {key: 0}})
    with pytest.raises(ConfigError, match=r"train\.warmup_steps"):
        Params.from_dict({"train": {"warmup_steps": -1}})


def test_corpus_needs_exactly_one_of_text_field_and_template():
    with pytest.raises(ConfigError, match="text_field"):
        CorpusParams(text_field="text", text_template="{a}")
    with pytest.raises(ConfigError, match="text_template"):
        CorpusParams(text_field=None, text_template=None)
    assert CorpusParams(text_field="text", text_template=None).text_field == "text"
    # txt needs neither
    assert CorpusParams(format="txt", text_field=None, text_template=None).format == "txt"
    with pytest.raises(ConfigError, match=r"corpus\.path"):
        Params.from_dict({"corpus": {"path": ""}})


def test_null_optional_fields():
    p = Params.from_dict({"corpus": {"owner_field": None, "id_field": None}})
    assert p.corpus.owner_field is None and p.corpus.id_field is None


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Params.load(tmp_path / "nope.yaml")
    bad = _write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        Params.load(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(ConfigError, match="mapping"):
        Params.load(_write(tmp_path, "- a\n- b\n"))
    assert Params.load(_write(tmp_path, "")) == Params()


def test_params_are_frozen():
    p = Params()
    with pytest.raises(AttributeError):
        p.train.seed = 3  # type: ignore[misc]


def test_training_identity_covers_model_and_train_except_log_every():
    base = Params()
    assert base.training_identity() == Params().training_identity()
    assert Params.from_dict({"train": {"log_every": 99}}).training_identity() == base.training_identity()
    assert (
        Params.from_dict({"ensemble": {"combine": "product"}}).training_identity() == base.training_identity()
    )
    assert Params.from_dict({"sharding": {"shards": 2}}).training_identity() == base.training_identity()
    assert Params.from_dict({"ray": {"max_parallel": 3}}).training_identity() == base.training_identity()
    for change in (
        {"train": {"deterministic": False}},  # its checkpoints cannot be reproduced: a different identity
        {"train": {"seed": 1}},
        {"train": {"learning_rate": 0.01}},
        {"model": {"layers": 3}},
        {"train": {"schedule": "cumulative"}},
        {"model": {"tokenizer": "gpt2"}},
    ):
        assert Params.from_dict(change).training_identity() != base.training_identity(), change


def test_the_default_identity_is_pinned():
    """Workspaces trained before a new train.* switch existed keep their checkpoints: a switch at its default
    leaves the identity alone (compile, deterministic)."""
    assert Params().training_identity() == "f73ccfd6b2671fb29a7652b403dbcb37aee4810a7f1cdade3cbedbe9adda1bf2"


def test_train_params_direct_construction_validates():
    with pytest.raises(ConfigError, match=r"train\.schedule"):
        TrainParams(schedule="weekly")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, [], False, "x"])
def test_a_section_that_is_not_a_mapping_is_refused(value):
    with pytest.raises(ConfigError, match="train"):
        Params.from_dict({"train": value})
