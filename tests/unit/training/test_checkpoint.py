"""checkpoint: the whole training state round-trips exactly, in safetensors and JSON, with stable bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sisaflow.core.fsio import sha256_file
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer
from sisaflow.training.checkpoint import (
    LINEAGE_FILE,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointMeta,
    load_training_state,
    load_weights,
    read_meta,
    save_checkpoint,
    weights_hash,
)


@pytest.fixture
def tok():
    return load_tokenizer("byte")


def _model(tiny_params, tok, seed=1):
    return build_model(tiny_params.model, tok.vocab_size, tok.eos_id, seed)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)


def _step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (4, 20), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _trained(tiny_params, tok, steps=3):
    model = _model(tiny_params, tok)
    opt = _optimizer(model)
    for s in range(steps):
        _step(model, opt, s)
    return model, opt


META = CheckpointMeta(
    shard=2, slice=1, chain="abc123", global_step=3, tokens_seen=240, examples_seen=12, last_loss=5.25
)


def test_save_writes_the_four_files_and_nothing_else(tmp_path, tiny_params, tok):
    model, opt = _trained(tiny_params, tok)
    d = tmp_path / "models" / "shard-2" / "slice-1"
    save_checkpoint(d, model, opt, META, ["h3", "h1", "h2"])
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [MODEL_FILE, OPTIMIZER_FILE, META_FILE, LINEAGE_FILE]
    )
    assert sorted(p.name for p in d.parent.iterdir()) == ["slice-1"]  # no temporary directories left
    assert json.loads((d / LINEAGE_FILE).read_text()) == ["h1", "h2", "h3"]
    assert json.loads((d / META_FILE).read_text()) == META.to_dict()
    assert read_meta(d) == META
    assert weights_hash(d) == sha256_file(d / MODEL_FILE)


def test_optimizer_file_holds_moments_steps_and_rng(tmp_path, tiny_params, tok):
    model, opt = _trained(tiny_params, tok, steps=3)
    save_checkpoint(tmp_path / "c", model, opt, META, [])
    n_params = len(list(model.parameters()))
    with safe_open(str(tmp_path / "c" / OPTIMIZER_FILE), "pt") as f:
        keys = set(f.keys())
        assert "rng.torch" in keys
        assert torch.equal(f.get_tensor("rng.torch"), torch.get_rng_state())
        for i in range(n_params):
            assert {f"param.{i}.exp_avg", f"param.{i}.exp_avg_sq", f"param.{i}.step"} <= keys
            assert float(f.get_tensor(f"param.{i}.step")) == 3.0
            assert f.get_tensor(f"param.{i}.exp_avg").abs().sum() > 0
            assert f.get_tensor(f"param.{i}.exp_avg_sq").abs().sum() > 0
    assert len(keys) == 1 + 3 * n_params


def test_same_state_gives_same_bytes(tmp_path, tiny_params, tok):
    model, opt = _trained(tiny_params, tok)
    rng = torch.get_rng_state()
    save_checkpoint(tmp_path / "a", model, opt, META, ["h2", "h1"])
    torch.set_rng_state(rng)
    save_checkpoint(tmp_path / "b", model, opt, META, ["h1", "h2"])
    for name in (MODEL_FILE, OPTIMIZER_FILE, META_FILE, LINEAGE_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_restored_state_continues_exactly(tmp_path, tiny_params, tok):
    model, opt = _trained(tiny_params, tok, steps=3)
    torch.manual_seed(1234)
    save_checkpoint(tmp_path / "c", model, opt, META, [])
    expected_draw = torch.rand(5)

    # a fresh model (other init) and optimizer, then the saved state
    model2 = _model(tiny_params, tok, seed=99)
    opt2 = _optimizer(model2)
    torch.manual_seed(0)
    load_training_state(tmp_path / "c", model2, opt2)
    assert torch.equal(torch.rand(5), expected_draw)  # RNG restored

    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        s1, s2 = opt.state[p1], opt2.state[p2]
        assert set(s1) == set(s2) == {"step", "exp_avg", "exp_avg_sq"}
        for key in s1:
            assert torch.equal(s1[key], s2[key]), key

    # the next steps are bitwise the same as in the uninterrupted run
    for s in (10, 11):
        l1, l2 = _step(model, opt, s), _step(model2, opt2, s)
        assert l1 == l2
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_load_weights_only(tmp_path, tiny_params, tok):
    model, opt = _trained(tiny_params, tok)
    save_checkpoint(tmp_path / "c", model, opt, META, [])
    other = _model(tiny_params, tok, seed=5)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    load_weights(tmp_path / "c", other)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    # tied embeddings stay tied after loading
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()


def test_untied_embeddings_round_trip(tmp_path, make_params, tok):
    params = make_params(model={"tie_embeddings": False})
    model, opt = _trained(params, tok)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    save_checkpoint(tmp_path / "c", model, opt, META, [])
    other = _model(params, tok, seed=5)
    load_training_state(tmp_path / "c", other, _optimizer(other))
    for (n1, a), (n2, b) in zip(model.named_parameters(), other.named_parameters()):
        assert n1 == n2 and torch.equal(a, b), n1


def test_overwrite_replaces_whole_checkpoint(tmp_path, tiny_params, tok):
    model, opt = _trained(tiny_params, tok)
    d = tmp_path / "c"
    save_checkpoint(d, model, opt, META, ["h1"])
    (d / "stray.txt").write_text("left from an older layout")
    _step(model, opt, 7)
    meta2 = CheckpointMeta(2, 1, "def", 4, 300, 16, 4.0)
    save_checkpoint(d, model, opt, meta2, ["h9"])
    assert read_meta(d) == meta2
    assert not (d / "stray.txt").exists()
    assert json.loads((d / LINEAGE_FILE).read_text()) == ["h9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_failed_save_keeps_previous_checkpoint(tmp_path, tiny_params, tok, monkeypatch):
    model, opt = _trained(tiny_params, tok)
    d = tmp_path / "c"
    save_checkpoint(d, model, opt, META, ["h1"])
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    import sisaflow.training.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_json", boom)
    with pytest.raises(OSError):
        save_checkpoint(d, model, opt, CheckpointMeta(2, 1, "x", 9, 9, 9, 1.0), ["h2"])
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_read_meta_of_incomplete_or_missing_checkpoint(tmp_path, tiny_params, tok):
    assert read_meta(tmp_path / "nothing") is None
    model, opt = _trained(tiny_params, tok, steps=1)
    d = tmp_path / "c"
    save_checkpoint(d, model, opt, META, [])
    (d / MODEL_FILE).unlink()
    assert read_meta(d) is None
