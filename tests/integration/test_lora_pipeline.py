"""The pipeline with LoRA constituents over a frozen base: init, run, forget one owner; the retrained adapter is
bitwise equal to one trained from scratch without that owner's records, untouched shards keep their adapters,
and the served ensemble is the batched LoRA over one shared base. The ensemble is served with the posterior
combination (weights by the context): after the forget it gives the tokens, the log-probabilities, the
membership scores and the routing of the ensemble trained from scratch without the owner, bit for bit.

The base is in the format `make base` gives SmolLM2: a tiny GGUF (byte-level BPE, SmolLM2's special tokens)
converted by `sisaflow.models.base_setup.convert_gguf` into a transformers directory, saved next to the workspaces and
named by a relative path (`../base`), as a user would name a base they keep beside their workspace.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from safetensors.torch import load_file

from tests.integration.conftest import make_workspace, tree_hashes, write_corpus
from tests.lora_base import save_tiny_gguf

pytestmark = pytest.mark.integration

AUTHORS = 8
SHARDS = SLICES = 2
LORA = {
    "tokenizer": "base",
    "base": "../base",
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
}


def _lora_workspace(directory, corpus):
    from sisaflow.core import versioning
    from sisaflow.core.paths import Workspace

    make_workspace(directory, corpus, shards=SHARDS, slices=SLICES)
    params = yaml.safe_load((directory / "params.yaml").read_text())
    params["model"].update(LORA)
    params["ensemble"]["combine"] = "posterior"
    params["ensemble"]["posterior"] = {"floor": 0.1}
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    versioning.git_commit(Workspace(directory), "LoRA over the tiny base", ["params.yaml"])
    return directory


@pytest.fixture(scope="module")
def story(tmp_path_factory, prefect_server):
    from sisaflow import cli
    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace
    from sisaflow.data.sharding import shard_of, slice_of

    os.environ["SISAFLOW_CERTIFICATE_KEY"] = "test-key-0123456789abcdef0123456789abcdef"
    from sisaflow.models.base_setup import convert_gguf

    tmp = tmp_path_factory.mktemp("lora")
    convert_gguf(save_tiny_gguf(tmp / "gguf" / "tiny.gguf"), tmp / "base")
    base_files = tree_hashes(tmp / "base")
    corpus = write_corpus(tmp / "corpus.jsonl", AUTHORS)
    a = _lora_workspace(tmp / "a", corpus)
    ws = Workspace(a)
    params = Params.load(ws.params_file)
    s = {"a": a, "params": params, "ws": ws}
    assert cli.main(["--workspace", str(a), "run"]) == 0  # on Ray: the workers get the base's absolute path
    s["before"] = {sh: tree_hashes(ws.model_dir(sh)) for sh in range(SHARDS)}

    owner = next(str(o) for o in range(AUTHORS) if slice_of(str(o), SLICES) > 0)
    s["owner"], s["shard"], s["slice"] = owner, shard_of(owner, SHARDS), slice_of(owner, SLICES)
    assert cli.main(["--workspace", str(a), "forget", "--owner", owner, "--in-process"]) == 0
    s["after"] = {sh: tree_hashes(ws.model_dir(sh)) for sh in range(SHARDS)}
    s["forget_report"] = json.loads(sorted((a / "runs").glob("*-forget.json"))[-1].read_text())

    # B: from scratch without the owner, in this process (A's first training ran in Ray workers)
    b = _lora_workspace(tmp / "b", write_corpus(tmp / "corpus_b.jsonl", AUTHORS, skip_owners={owner}))
    assert cli.main(["--workspace", str(b), "run", "--in-process"]) == 0
    s["scratch"] = {sh: tree_hashes(Workspace(b).model_dir(sh)) for sh in range(SHARDS)}
    s["b"] = b
    s["base_unchanged"] = tree_hashes(tmp / "base") == base_files
    return s


def test_the_base_is_resolved_and_checkpoints_hold_adapters_only(story):
    assert story["params"].model.base == str((story["a"].parent / "base").resolve())
    assert story["base_unchanged"]
    ckpt = story["ws"].checkpoint_dir(0, SLICES - 1)
    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)


def test_forget_retrains_only_the_owners_shard_from_its_slice(story):
    trained = story["forget_report"]["trained"]
    assert {int(k): v["from_slice"] for k, v in trained.items()} == {story["shard"]: story["slice"]}
    other = 1 - story["shard"]
    assert story["after"][other] == story["before"][other]  # untouched adapters: the same files
    changed = f"slice-{story['slice']}/model.safetensors"
    assert story["after"][story["shard"]][changed] != story["before"][story["shard"]][changed]


def test_retrained_adapter_equals_training_from_scratch_without_the_records(story):
    for sh in range(SHARDS):
        assert story["after"][sh].keys() == story["scratch"][sh].keys()
        assert story["after"][sh] == story["scratch"][sh]  # adapter, optimizer state, counters, lineage


def test_the_served_ensemble_is_the_batched_lora_over_one_base(story):
    from sisaflow.core.base_files import base_identity
    from sisaflow.inference.ensemble import Ensemble
    from sisaflow.inference.registry import read_registry
    from sisaflow.inference.stacked import StackedLlama

    reg = read_registry(story["ws"])
    assert reg["base_sha256"] == base_identity(story["params"].model.base)
    ens = Ensemble.load(story["ws"])
    assert isinstance(ens.runner, StackedLlama) and ens.runner.deltas and ens.shards == [0, 1]
    text = ens.generate("Question: Who is the author?\nAnswer:", max_new_tokens=10)
    assert isinstance(text, str)
    assert ens.score("Question: Who?\nAnswer: An author.")["log_likelihood"] < 0


def test_verify_exact_holds_for_lora(story):
    from sisaflow.pipeline.exactness import verify_exact

    results = verify_exact(story["ws"], story["params"])
    assert [r.shard for r in results] == [0, 1] and all(r.equal for r in results)


def test_the_routed_ensemble_after_a_forget_is_the_one_trained_without_the_owner(story, tmp_path):
    """Tokens, log-probabilities (float64) and what evaluate reports of the forgotten owner's records (Min-K%
    AUC against never-seen authors, the routing weight of her former shard) equal those of the ensemble
    trained from scratch without her: the served model after the forget is the retrained reference itself."""
    import torch

    from sisaflow.core.hashing import workspace_hasher
    from sisaflow.core.paths import Workspace
    from sisaflow.data.corpus import read_records
    from sisaflow.evaluation.evaluate import attacks, routing_vs_never_seen, score_records
    from sisaflow.inference.ensemble import Ensemble

    ep = story["params"].evaluate
    a = Ensemble.load(story["ws"], dtype=torch.float64)
    b = Ensemble.load(Workspace(story["b"]), dtype=torch.float64)
    assert a.combine == b.combine == "posterior" and a.posterior.floor == 0.1
    prompts = ["Question: Who is the author?\nAnswer:", "Question: Where was she born?\nAnswer:"]
    assert a.generate(prompts, max_new_tokens=12) == b.generate(prompts, max_new_tokens=12)
    assert a.generate(prompts, max_new_tokens=12, temperature=1.0, seed=5) == b.generate(
        prompts, max_new_tokens=12, temperature=1.0, seed=5
    )
    x, mask = a.encode_prompts(prompts)
    assert torch.equal(a(x, attention_mask=mask).logits, b(x, attention_mask=mask).logits)
    assert a.routing_weights(prompts[0]) == b.routing_weights(prompts[0])

    corpus = story["params"].corpus
    lines = (story["a"].parent / "corpus.jsonl").read_text().splitlines()
    owner = story["owner"]
    mine_path, never_path = tmp_path / "mine.jsonl", tmp_path / "never.jsonl"
    mine_path.write_text("\n".join(ln for ln in lines if f'"author_id": {owner},' in ln) + "\n")
    from tests.integration.conftest import TOFU

    never_path.write_text("\n".join(TOFU.read_text().splitlines()[AUTHORS * 20 : AUTHORS * 20 + 40]) + "\n")
    hasher = workspace_hasher(story["ws"], corpus)
    forgotten = read_records(mine_path, corpus, hasher)[:10]
    never = read_records(never_path, corpus, hasher)[:20]
    assert forgotten and all(r.owner == owner for r in forgotten)
    reports = []
    for ens in (a, b):
        gone, seen = score_records(ens, forgotten, {}), score_records(ens, never, {})
        assert gone[0].route is not None and sum(gone[0].route) == pytest.approx(1.0)
        routing = routing_vs_never_seen(ens, gone, [story["shard"]] * len(gone), seen, ep)
        reports.append((attacks(gone, seen, ep)["min_k"], routing))
    assert reports[0] == reports[1]
