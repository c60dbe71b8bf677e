"""training: deterministic, resumable, slice-exact retraining of one shard on a tiny model (CPU, 1 thread)."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors import safe_open

import sisaflow.training.loop as training
from sisaflow.core.config import ShardingParams
from sisaflow.core.fsio import read_json
from sisaflow.data.corpus import Record, content_hash, from_table, read_table, to_table, write_table
from sisaflow.data.sharding import read_shard_manifest, read_slice, shard_corpus
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer
from sisaflow.training.checkpoint import (
    LINEAGE_FILE,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    load_weights,
    read_meta,
)
from sisaflow.training.loop import (
    chain_hashes,
    derive_seed,
    first_stale_slice,
    train_shard,
)

SLICES = 3
FILES = (MODEL_FILE, OPTIMIZER_FILE, META_FILE, LINEAGE_FILE)


@pytest.fixture
def corpus(make_records):
    return make_records(owners=12, per_owner=3)


@pytest.fixture
def sharded(make_workspace, corpus):
    """make(records=corpus, name) -> a one-shard, three-slice workspace; every slice holds records."""

    def make(records=None, name="ws"):
        ws = make_workspace(records if records is not None else corpus, shards=1, slices=SLICES, name=name)
        sizes = [s["records"] for s in read_shard_manifest(ws, 0)["slices"]]
        assert all(n > 0 for n in sizes), f"test corpus leaves a slice empty: {sizes}"
        return ws

    return make


def ckpt_files(ws, shard=0, slices=range(SLICES)) -> dict[tuple[int, str], bytes]:
    return {(k, f): (ws.checkpoint_dir(shard, k) / f).read_bytes() for k in slices for f in FILES}


def ckpt_mtimes(ws, shard=0) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(ws.model_dir(shard).rglob("*")) if p.is_file()}


def quiet(msg: str) -> None:
    pass


def edit_record_in_slice(ws, k: int, slices=SLICES) -> list[Record]:
    """Change the text of one record of slice k (same id, same owner) and reshard; return the new corpus."""
    victim = read_slice(ws, 0, k)[0]
    records = [
        Record(r.record_id, r.owner, r.text + " EDITED", content_hash(r.record_id, r.text + " EDITED"))
        if r.record_id == victim.record_id
        else r
        for r in from_table(read_table(ws.corpus_file))
    ]
    write_table(ws.corpus_file, to_table(records))
    shard_corpus(ws, ShardingParams(shards=1, slices=slices))
    return records


# ---------------------------------------------------------------------------------------------------- helpers


def test_derive_seed_known_answer_and_range():
    import hashlib

    h = hashlib.sha256(repr((0, "train", 1, 2, 3)).encode()).digest()
    assert derive_seed(0, "train", 1, 2, 3) == int.from_bytes(h[:8], "big") >> 1
    assert 0 <= derive_seed(123, "init", 7) < 2**63
    assert derive_seed(0, "train", 0, 1, 0) != derive_seed(0, "train", 0, 0, 1)
    assert derive_seed(0, "init", 0) != derive_seed(1, "init", 0)


def test_chain_hashes_are_prefix_identities():
    a = chain_hashes("id", ["d0", "d1", "d2"])
    b = chain_hashes("id", ["d0", "X1", "d2"])
    c = chain_hashes("other", ["d0", "d1", "d2"])
    assert len(a) == 3 and len(set(a)) == 3
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]  # a change at k invalidates k and everything after
    assert all(x != y for x, y in zip(a, c))
    assert chain_hashes("id", ["d0", "d1"]) == a[:2]


# ------------------------------------------------------------------------------------------------ determinism


def test_training_twice_from_scratch_is_bitwise_identical(sharded, tiny_params):
    ws1, ws2 = sharded(name="a"), sharded(name="b")
    threads = torch.get_num_threads()
    r1 = train_shard(ws1, 0, tiny_params, progress=quiet)
    assert torch.get_num_threads() == threads  # the thread setting is restored
    r2 = train_shard(ws2, 0, tiny_params, progress=quiet)
    assert r1.start_slice == 0 and [s.slice for s in r1.slices] == [0, 1, 2]
    assert r1.device == "cpu"
    assert all(s.steps > 0 and s.loss is not None for s in r1.slices)
    assert [(s.examples, s.tokens, s.steps, s.loss) for s in r1.slices] == [
        (s.examples, s.tokens, s.steps, s.loss) for s in r2.slices
    ]
    f1, f2 = ckpt_files(ws1), ckpt_files(ws2)
    assert f1 == f2
    # and the checkpoints really differ from slice to slice (training happened)
    assert len({f1[(k, MODEL_FILE)] for k in range(SLICES)}) == SLICES


def test_seed_changes_the_weights(sharded, make_params):
    ws1, ws2 = sharded(name="a"), sharded(name="b")
    train_shard(ws1, 0, make_params(), progress=quiet)
    train_shard(ws2, 0, make_params(train={"seed": 1}), progress=quiet)
    assert ckpt_files(ws1)[(0, MODEL_FILE)] != ckpt_files(ws2)[(0, MODEL_FILE)]


def test_up_to_date_shard_trains_nothing(sharded, make_params):
    ws = sharded()
    train_shard(ws, 0, make_params(), progress=quiet)
    before = ckpt_mtimes(ws)
    msgs = []
    rep = train_shard(
        ws, 0, make_params(train={"log_every": 7}), progress=msgs.append
    )  # log_every: no identity
    assert rep.start_slice == SLICES and rep.slices == [] and rep.tokens == 0
    assert any("up to date" in m for m in msgs)
    assert ckpt_mtimes(ws) == before


def test_changed_training_settings_retrain_from_slice_0(sharded, make_params):
    ws = sharded()
    train_shard(ws, 0, make_params(), progress=quiet)
    p2 = make_params(train={"learning_rate": 0.001})
    digests = [s["digest"] for s in read_shard_manifest(ws, 0)["slices"]]
    assert first_stale_slice(ws, 0, chain_hashes(p2.training_identity(), digests)) == 0
    rep = train_shard(ws, 0, p2, progress=quiet)
    assert rep.start_slice == 0 and len(rep.slices) == SLICES


# ------------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("lost", [1, 2])
def test_resume_after_losing_last_checkpoints_equals_uninterrupted(sharded, tiny_params, lost):
    ref, ws = sharded(name="ref"), sharded(name="crashed")
    train_shard(ref, 0, tiny_params, progress=quiet)
    train_shard(ws, 0, tiny_params, progress=quiet)
    first_lost = SLICES - lost
    for k in range(first_lost, SLICES):
        shutil.rmtree(ws.checkpoint_dir(0, k))
    kept_mtimes = {p: m for p, m in ckpt_mtimes(ws).items()}
    # a crash in the middle of an atomic write leaves a hidden temporary directory behind
    junk = ws.model_dir(0) / f".slice-{first_lost}.abcd.tmp"
    junk.mkdir()
    (junk / MODEL_FILE).write_bytes(b"half a file")

    msgs = []
    rep = train_shard(ws, 0, tiny_params, progress=msgs.append)
    assert rep.start_slice == first_lost
    assert [s.slice for s in rep.slices] == list(range(first_lost, SLICES))
    assert any(f"resuming from the checkpoint after slice {first_lost - 1}" in m for m in msgs)
    assert ckpt_files(ws) == ckpt_files(ref)
    assert not junk.exists()
    assert sorted(p.name for p in ws.model_dir(0).iterdir()) == [f"slice-{k}" for k in range(SLICES)]
    # the checkpoints that survived were not touched
    after = ckpt_mtimes(ws)
    assert all(after[p] == m for p, m in kept_mtimes.items())


def test_a_checkpoint_records_its_environment_and_a_resume_under_another_says_so(sharded, tiny_params):
    from sisaflow.core.fsio import write_json
    from sisaflow.training.checkpoint import UNRECORDED

    ws = sharded()
    train_shard(ws, 0, tiny_params, progress=quiet)
    here = training.numerics_environment(torch.device("cpu"), lora=False)
    assert here["torch"] == torch.__version__ and here["device"].startswith("cpu ")
    assert all(read_meta(ws.checkpoint_dir(0, k)).environments == [here] for k in range(SLICES))

    other = {**here, "torch": "2.0.0"}  # as if slice 0 had been trained before an upgrade
    meta_0 = ws.checkpoint_dir(0, 0) / META_FILE
    write_json(meta_0, {**read_json(meta_0), "environments": [other]})
    for k in (1, 2):
        shutil.rmtree(ws.checkpoint_dir(0, k))
    msgs: list[str] = []
    train_shard(ws, 0, tiny_params, progress=msgs.append)
    note = [m for m in msgs if "note:" in m]
    assert len(note) == 1 and "torch 2.0.0" in note[0] and f"torch {torch.__version__}" in note[0]
    assert str(ws.model_dir(0)) in note[0]  # how to retrain the shard from its first slice
    assert read_meta(ws.checkpoint_dir(0, 2)).environments == [other, here]

    quiet_msgs: list[str] = []  # a resume in the same environment says nothing of it
    shutil.rmtree(ws.checkpoint_dir(0, 2))
    train_shard(ws, 0, tiny_params, progress=quiet_msgs.append)
    assert not [m for m in quiet_msgs if "note:" in m]

    data = read_json(meta_0)  # a checkpoint made before environments were recorded
    del data["environments"]
    write_json(meta_0, data)
    assert read_meta(ws.checkpoint_dir(0, 0)).environments == [UNRECORDED]


def test_crash_while_saving_then_resume_equals_uninterrupted(sharded, tiny_params, monkeypatch):
    ref, ws = sharded(name="ref"), sharded(name="crashed")
    train_shard(ref, 0, tiny_params, progress=quiet)

    real_save = training.save_checkpoint

    def crashing_save(directory, *args, **kwargs):
        if directory.name == "slice-2":
            raise KeyboardInterrupt("power cut")
        return real_save(directory, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train_shard(ws, 0, tiny_params, progress=quiet)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert read_meta(ws.checkpoint_dir(0, 1)) is not None and read_meta(ws.checkpoint_dir(0, 2)) is None

    rep = train_shard(ws, 0, tiny_params, progress=quiet)
    assert rep.start_slice == 2
    assert ckpt_files(ws) == ckpt_files(ref)


# ---------------------------------------------------------------------------------------------- exact retrain


@pytest.mark.parametrize("schedule", ["incremental", "cumulative"])
def test_changed_record_in_slice_1_retrains_from_1_and_equals_scratch(sharded, make_params, schedule):
    params = make_params(train={"schedule": schedule})
    ws = sharded(name="ws")
    train_shard(ws, 0, params, progress=quiet)
    old = ckpt_files(ws)
    slice0_mtimes = {p: m for p, m in ckpt_mtimes(ws).items() if p.parent.name == "slice-0"}

    changed = edit_record_in_slice(ws, 1)
    digests = [s["digest"] for s in read_shard_manifest(ws, 0)["slices"]]
    chain = chain_hashes(params.training_identity(), digests)
    assert first_stale_slice(ws, 0, chain) == 1

    rep = train_shard(ws, 0, params, progress=quiet)
    assert rep.start_slice == 1 and [s.slice for s in rep.slices] == [1, 2]
    assert first_stale_slice(ws, 0, chain) == SLICES

    scratch = sharded(changed, name="scratch")
    rep_s = train_shard(scratch, 0, params, progress=quiet)
    assert rep_s.start_slice == 0
    new, fresh = ckpt_files(ws), ckpt_files(scratch)
    for k in range(SLICES):
        for f in (MODEL_FILE, OPTIMIZER_FILE, LINEAGE_FILE, META_FILE):
            assert new[(k, f)] == fresh[(k, f)], (k, f)
    # slice 0 was kept as it was; slices 1 and 2 really changed
    assert new[(0, MODEL_FILE)] == old[(0, MODEL_FILE)]
    assert all(ckpt_mtimes(ws)[p] == m for p, m in slice0_mtimes.items())
    assert new[(1, MODEL_FILE)] != old[(1, MODEL_FILE)] and new[(2, MODEL_FILE)] != old[(2, MODEL_FILE)]


def test_change_in_last_slice_retrains_only_it(sharded, tiny_params):
    ws = sharded()
    train_shard(ws, 0, tiny_params, progress=quiet)
    edit_record_in_slice(ws, SLICES - 1)
    rep = train_shard(ws, 0, tiny_params, progress=quiet)
    assert rep.start_slice == SLICES - 1 and len(rep.slices) == 1


def test_cumulative_schedule_trains_on_all_earlier_slices(sharded, make_params):
    ws = sharded()
    sizes = [s["records"] for s in read_shard_manifest(ws, 0)["slices"]]
    inc = train_shard(sharded(name="inc"), 0, make_params(), progress=quiet)
    cum = train_shard(ws, 0, make_params(train={"schedule": "cumulative"}), progress=quiet)
    assert [s.examples for s in inc.slices] == sizes
    assert [s.examples for s in cum.slices] == [sum(sizes[: k + 1]) for k in range(SLICES)]
    # lineage names only the slice's own records
    for k in range(SLICES):
        lineage = read_json(ws.checkpoint_dir(0, k) / LINEAGE_FILE)
        assert lineage == sorted(r.content_hash for r in read_slice(ws, 0, k))


def test_deleting_an_owner_of_slice_1_retrains_from_1_and_equals_scratch(sharded, tiny_params):
    ws = sharded(name="ws")
    train_shard(ws, 0, tiny_params, progress=quiet)
    owner = read_slice(ws, 0, 1)[0].owner
    kept = [r for r in from_table(read_table(ws.corpus_file)) if r.owner != owner]
    write_table(ws.corpus_file, to_table(kept))
    shard_corpus(ws, ShardingParams(shards=1, slices=SLICES))
    assert owner not in {r.owner for k in range(SLICES) for r in read_slice(ws, 0, k)}
    rep = train_shard(ws, 0, tiny_params, progress=quiet)
    assert rep.start_slice == 1
    scratch = sharded(kept, name="scratch")
    train_shard(scratch, 0, tiny_params, progress=quiet)
    assert ckpt_files(ws) == ckpt_files(scratch)
    # no checkpoint's lineage names the forgotten records
    remaining = {r.content_hash for r in kept}
    for k in range(SLICES):
        assert set(read_json(ws.checkpoint_dir(0, k) / LINEAGE_FILE)) <= remaining


def test_encoding_is_independent_of_input_order(corpus, tiny_params):
    encoded = training._encode(corpus, tiny_params.model)
    assert training._encode(list(reversed(corpus)), tiny_params.model) == encoded
    assert training._encode(sorted(corpus, key=lambda r: r.text), tiny_params.model) == encoded
    assert all(e[-1] == 256 and len(e) <= 96 for e in encoded)


# ---------------------------------------------------------------------------------------------------- learning


def _mean_loss(model, texts) -> float:
    tok = load_tokenizer("byte")
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok.encode(t) + [tok.eos_id]])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return total / n


def test_loss_decreases_over_epochs_on_a_repeated_corpus(make_records, make_workspace, make_params):
    records = make_records(owners=4, per_owner=4)
    ws = make_workspace(records, shards=1, slices=1)
    params = make_params(sharding={"slices": 1}, train={"epochs_per_slice": 8, "log_every": 1000})
    msgs = []
    rep = train_shard(ws, 0, params, progress=msgs.append)
    epoch_loss = [float(m) for m in re.findall(r"epoch \d+/8 step 2/2 loss ([0-9.]+)", "\n".join(msgs))]
    assert len(epoch_loss) == 8
    assert epoch_loss[-1] < epoch_loss[0] - 1.0
    assert all(b < a for a, b in zip(epoch_loss, epoch_loss[1:])), epoch_loss
    assert rep.slices[0].steps == 16

    tok = load_tokenizer("byte")
    texts = [r.text for r in records]
    init = build_model(params.model, tok.vocab_size, tok.eos_id, derive_seed(params.train.seed, "init", 0))
    trained = build_model(params.model, tok.vocab_size, tok.eos_id, 0)
    load_weights(ws.checkpoint_dir(0, 0), trained)
    init_loss, trained_loss = _mean_loss(init, texts), _mean_loss(trained, texts)
    assert init_loss == pytest.approx(torch.log(torch.tensor(257.0)).item(), abs=0.1)  # ~uniform at init
    assert trained_loss < init_loss - 1.0


# ------------------------------------------------------------------------------------------- checkpoint state


def test_checkpoint_holds_the_whole_training_state(sharded, tiny_params):
    ws = sharded()
    rep = train_shard(ws, 0, tiny_params, progress=quiet)
    digests = [s["digest"] for s in read_shard_manifest(ws, 0)["slices"]]
    chain = chain_hashes(tiny_params.training_identity(), digests)
    steps = tokens = examples = 0
    tok = load_tokenizer("byte")
    model = build_model(tiny_params.model, tok.vocab_size, tok.eos_id, 0)
    n_params = len(list(model.parameters()))
    for k, s in enumerate(rep.slices):
        steps += s.steps
        tokens += s.tokens
        examples += s.examples
        d = ws.checkpoint_dir(0, k)
        meta = read_meta(d)
        assert (meta.shard, meta.slice, meta.chain) == (0, k, chain[k])
        assert meta.global_step == steps
        assert meta.tokens_seen == tokens
        assert meta.examples_seen == examples * tiny_params.train.epochs_per_slice
        assert meta.last_loss == s.loss
        # tokens: every record's bytes plus end-of-text, truncated to the context
        expected_tokens = sum(min(len(r.text.encode()) + 1, 96) for r in read_slice(ws, 0, k))
        assert s.tokens == expected_tokens
        assert s.steps == -(-s.examples // tiny_params.train.batch_size)
        with safe_open(str(d / OPTIMIZER_FILE), "pt") as f:
            keys = set(f.keys())
            assert "rng.torch" in keys and f.get_tensor("rng.torch").dtype == torch.uint8
            for i in range(n_params):
                assert float(f.get_tensor(f"param.{i}.step")) == steps
                assert f.get_tensor(f"param.{i}.exp_avg").abs().sum() > 0
                assert f.get_tensor(f"param.{i}.exp_avg_sq").abs().sum() > 0
        assert read_json(d / LINEAGE_FILE) == sorted(r.content_hash for r in read_slice(ws, 0, k))
    assert rep.tokens == tokens


def test_context_length_truncates_examples(make_records, make_workspace, make_params):
    records = [Record("long", "o", "x" * 500, content_hash("long", "x" * 500))]
    ws = make_workspace(records, shards=1, slices=1)
    rep = train_shard(ws, 0, make_params(sharding={"slices": 1}), progress=quiet)
    assert rep.slices[0].tokens == 96


def test_process_wide_torch_settings_are_put_back(sharded, make_params):
    """train_shard fixes the thread count and deterministic algorithms while it trains, then restores the
    caller's: a benchmark's own loop or inference afterwards runs as it would have without the call."""
    ws = sharded()
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    try:
        train_shard(ws, 0, make_params(train={"threads": 1}), progress=lambda m: None)
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
