"""The CUDA training path: bf16 autocast, fused AdamW, optional torch.compile; and the CPU path left exactly as it
was. The choices are checked on CPU; the runs themselves carry the `gpu` marker and skip without CUDA, and each
has a CPU twin that CI runs (this module's own logic, checked where there is no device).

On a CUDA machine, all the `gpu` tests and where their time goes:

    python -m pytest -q -rfEs -p no:cacheprovider -m gpu --durations=0 tests/

What they cost, by design (issue 18: `-m gpu` in under 120 s on an H200). Training on the device happens in two
places: the exactness runs (two trainings of the same records, a retraining after a deletion resumed from a
checkpoint, a training from scratch without the deleted owner) run once per mode in a module-scoped fixture that
three tests share, and are the only from-scratch trainings on the device; and one LoRA run per mode in
test_training_trains_and_resumes. Dynamo caches compiled code on the forward's code object and guards on shapes,
dtypes and global settings (deterministic flags, thread count), not on the model instance: a fresh model of the same
architecture reuses the graph, a LoRA model is a graph of its own, a new shape compiles again. So the module
compiles SCRATCH_GRAPHS + RETRAIN_GRAPHS + LORA_GRAPHS = 6 graphs on CUDA (counted on CPU with a counting backend by
test_compilation_is_paid_once_per_process_not_per_shard_or_slice): the from-scratch Llama twice (its records are of
several widths, as real text is: the first batch's shape compiles statically, the next one dynamic graph for all the
rest), three times more for the retraining after a deletion, which starts from a reset compiler as in a fresh Ray
worker (its first batch, of slice 1, meets a static graph where the first trainings met the dynamic one: whether the
two give the same bits is what compiled exactness across processes rests on), and the LoRA model once (records of
one width, one to a batch: one shape). Each is inductor's forward and backward of a 2-layer, hidden-32 Llama: an
estimated 10-25 s cold on the H200 machine (a 30-layer model took 60 s there; not yet timed for this model), so
about 60-150 s of compilation, and 90-180 s for every `gpu` test with CUDA's start, the eager runs and the inference
tests (test_graphed.py and test_smollm2.py carry the marker too: the first captures CUDA graphs and compiles
nothing, the second skips without its model file). The previous layout compiled the from-scratch model in two tests
and the LoRA model at several shapes: five tests passed in 150 s and the rest were cut off.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import sisaflow.training.loop as training
from sisaflow.core.config import Params, ShardingParams
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import Record, from_table, read_table, to_table, write_table
from sisaflow.data.sharding import read_slice, shard_corpus
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer
from sisaflow.training.checkpoint import MODEL_FILE, OPTIMIZER_FILE
from sisaflow.training.loop import ShardTrainReport, train_shard
from tests.lora_base import save_tiny_base


def quiet(msg: str) -> None:
    pass


def _model(tiny_params):
    tok = load_tokenizer("byte")
    return build_model(tiny_params.model, tok.vocab_size, tok.eos_id, 0)


def test_cpu_keeps_the_single_tensor_adamw_eager_forward_and_no_autocast(tiny_params):
    model = _model(tiny_params)
    cpu = torch.device("cpu")
    opt = training._optimizer(model, 1e-3, 0.0, cpu)
    assert opt.defaults["foreach"] is False and not opt.defaults["fused"]
    assert training._forward_fn(model, True, cpu) is model  # train.compile is ignored on CPU
    assert not isinstance(training._autocast(cpu), torch.autocast)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cuda_asks_for_bf16_autocast_fused_adamw_and_compile(tiny_params, monkeypatch):
    model = _model(tiny_params)
    cuda = torch.device("cuda")
    assert training._optimizer(model, 1e-3, 0.0, cuda).defaults["fused"] is True
    ctx = training._autocast(cuda)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    monkeypatch.setattr(torch, "compile", lambda m, **kw: ("compiled", m, kw))
    assert training._forward_fn(model, True, cuda) == ("compiled", model, {"backend": "inductor"})
    assert training._forward_fn(model, False, cuda) is model


def _settings_inside(tp_raw: dict, device: str, said: list[str]) -> dict:
    from sisaflow.core.config import TrainParams

    with training._process_settings(TrainParams(**tp_raw), torch.device(device), said.append):
        return {
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "strict": not torch.is_deterministic_algorithms_warn_only_enabled(),
            "fill": torch.utils.deterministic.fill_uninitialized_memory,
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        }


def _without_cublas_setting(monkeypatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so what the code sets is undone afterwards
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")


def _settings_now() -> tuple:
    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )


@pytest.mark.parametrize("compile_", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])
def test_compiled_deterministic_cuda_training_always_pads_misaligned_matmuls(
    monkeypatch, deterministic, compile_
):
    """Deterministic mode stops inductor benchmarking whether to pad a matmul, so it would never pad: compiled
    strict training pads always (a fixed choice), for the training only."""
    import torch._inductor.config as inductor_config

    _without_cublas_setting(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    from sisaflow.core.config import TrainParams

    tp = TrainParams(deterministic=deterministic, compile=compile_)
    assert inductor_config.force_shape_pad is False
    with training._process_settings(tp, torch.device("cuda"), quiet):
        inside = inductor_config.force_shape_pad
    assert inside is (deterministic and compile_) and inductor_config.force_shape_pad is False
    with training._process_settings(tp, torch.device("cpu"), quiet):  # CPU never compiles
        assert inductor_config.force_shape_pad is False


@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_settings_fix_cublas_and_skip_the_nan_fill_then_are_put_back(monkeypatch, deterministic):
    """On CUDA, train.deterministic sets cuBLAS's fixed workspace before the first GPU matmul and turns on the
    strict deterministic mode (warn-only leaves the attention kernels' backward non-deterministic: two runs on an
    H200 gave different weights); deterministic mode's NaN fill of new tensors (a kernel per allocation) is off
    there; and all of it is the caller's again after."""
    _without_cublas_setting(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    before, said = _settings_now(), []
    inside = _settings_inside({"deterministic": deterministic}, "cuda", said)
    assert inside == {
        "deterministic": deterministic,
        "strict": deterministic,
        "fill": False,
        "cublas": ":4096:8" if deterministic else None,
    }
    assert _settings_now() == before and said == []


def test_an_operation_the_strict_mode_refuses_says_how_to_train_anyway(monkeypatch):
    from sisaflow.core.config import TrainParams

    _without_cublas_setting(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    refusal = "index_reduce_cuda does not have a deterministic implementation, but you set ..."
    with pytest.raises(RuntimeError, match="set train.deterministic: false") as info:
        with training._process_settings(TrainParams(), torch.device("cuda"), quiet):
            raise RuntimeError(refusal)
    assert refusal in str(info.value)
    with pytest.raises(RuntimeError) as other:  # any other error passes through as it was
        with training._process_settings(TrainParams(), torch.device("cuda"), quiet):
            raise RuntimeError("CUDA out of memory")
    assert str(other.value) == "CUDA out of memory"


def test_cpu_settings_keep_the_fill_and_never_touch_cublas(monkeypatch):
    _without_cublas_setting(monkeypatch)
    inside = _settings_inside({}, "cpu", [])
    assert inside == {"deterministic": True, "strict": False, "fill": True, "cublas": None}


def test_a_cuda_process_started_without_the_cublas_setting_is_told(monkeypatch):
    """cuBLAS reads the variable once: too late to set it after the process has used the GPU, so say so (and stay
    warn-only: the strict mode would refuse every matmul)."""
    _without_cublas_setting(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    said: list[str] = []
    inside = _settings_inside({}, "cuda", said)
    assert inside["cublas"] is None and inside["deterministic"] and not inside["strict"]
    assert len(said) == 1 and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in said[0]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own deterministic choice is kept
    said.clear()
    inside = _settings_inside({}, "cuda", said)
    assert inside["cublas"] == ":16:8" and inside["strict"] and said == []


def test_train_compile_changes_nothing_on_cpu(make_workspace, make_records, make_params):
    records = make_records(owners=6, per_owner=2)
    a, b = make_workspace(records, name="a"), make_workspace(records, name="b")
    train_shard(a, 0, make_params(), progress=quiet)
    train_shard(b, 0, make_params(train={"compile": True}), progress=quiet)
    for k in range(3):
        for f in (MODEL_FILE, OPTIMIZER_FILE):
            assert (a.checkpoint_dir(0, k) / f).read_bytes() == (b.checkpoint_dir(0, k) / f).read_bytes()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = [pytest.mark.gpu, CUDA]
SCRATCH_GRAPHS, RETRAIN_GRAPHS, LORA_GRAPHS = 2, 3, 1
"""The graphs dynamo compiles in this module's compiled CUDA runs (the module docstring; counted on CPU by
test_compilation_is_paid_once_per_process_not_per_shard_or_slice)."""


def _params(**overrides: dict):
    from tests.conftest import TINY_RAW, _merge

    return Params.from_dict(_merge(TINY_RAW, overrides))


def _records(owners: int, per_owner: int, width: int | None = None) -> list[Record]:
    """conftest's make_records; with `width`, every text padded to that many bytes (the byte tokenizer makes
    one token of a byte), so every batch of a LoRA run has one shape and compiles one graph."""
    from tests.conftest import record

    out = []
    for o in range(owners):
        for i in range(per_owner):
            text = f"Question: what is {o} plus {i}? Answer: {o + i}, said owner {o}."
            out.append(record(f"r-{o:02d}-{i:02d}", f"o-{o:02d}", text.ljust(width or 0, ".")))
    return out


def _workspace(root: Path, records: list[Record], name: str, slices: int = 3) -> Workspace:
    ws = Workspace(root / name)
    ws.root.mkdir(parents=True)
    write_table(ws.corpus_file, to_table(records))
    shard_corpus(ws, ShardingParams(shards=1, slices=slices))
    return ws


@dataclass
class Exactness:
    """What the exactness run of one (device, mode) left: its reports and every checkpoint file's bytes."""

    device: str
    reports: dict[str, ShardTrainReport]
    files: dict[str, dict[tuple[int, str], bytes]]


def exactness_run(root: Path, device: str, compile_: bool, trained=lambda name: None) -> Exactness:
    """Two trainings of the same records (workspaces a, b); then a's owner in slice 1 is deleted and a retrains
    from its slice-0 checkpoint (a resumed fused AdamW on a GPU), and a third workspace trains the kept records
    from scratch. Records of several widths, so a compiled run meets a static and then a dynamic graph.
    `trained(name)` is called after each training (the compile-count test reads its counter there)."""
    from tests.unit.training.test_loop import ckpt_files

    params = _params(train={"device": device, "compile": compile_})
    records = _records(owners=12, per_owner=3)
    a, b = _workspace(root, records, "a"), _workspace(root, records, "b")
    assert all(read_slice(a, 0, k) for k in range(3))  # every slice trains
    reports, files = {}, {}
    for name, ws in (("a", a), ("b", b)):
        reports[name] = train_shard(ws, 0, params, progress=quiet)
        files[name] = ckpt_files(ws)
        trained(name)
    owner = read_slice(a, 0, 1)[0].owner
    kept = [r for r in from_table(read_table(a.corpus_file)) if r.owner != owner]
    write_table(a.corpus_file, to_table(kept))
    shard_corpus(a, params.sharding)
    if compile_:
        # a retraining runs in a fresh Ray worker: no graph compiled before it. It starts at slice 1, so its
        # first batch meets a static graph where the trainings above met the dynamic one: exactness needs the
        # two to give the same bits, and this is where a device shows whether they do
        torch._dynamo.reset()
    reports["retrained"] = train_shard(a, 0, params, progress=quiet)
    files["retrained"] = ckpt_files(a)
    trained("retrained")
    scratch = _workspace(root, kept, "scratch")
    reports["scratch"] = train_shard(scratch, 0, params, progress=quiet)
    files["scratch"] = ckpt_files(scratch)
    trained("scratch")
    return Exactness(device, reports, files)


def lora_run(root: Path, device: str, compile_: bool, trained=lambda name: None) -> ShardTrainReport:
    """A LoRA adapter trained over three slices, then its last slice again from slice 1's checkpoint (a fused
    AdamW resumed on a GPU). Records of one width, one to a batch: every batch has one shape, so compiled it is
    one graph (a LoRA model is a graph of its own; what the widths do to compilation is the exactness run's)."""
    model = {"tokenizer": "base", "base": str(save_tiny_base(root / "base"))}
    params = _params(train={"device": device, "compile": compile_, "batch_size": 1}, model=model)
    ws = _workspace(root, _records(owners=8, per_owner=3, width=72), "lora")
    report = train_shard(ws, 0, params, progress=quiet)
    trained("first")
    shutil.rmtree(ws.checkpoint_dir(0, 2))
    again = train_shard(ws, 0, params, progress=quiet)  # resumes a fused AdamW: its step lives on the GPU
    trained("resumed")
    assert again.start_slice == 2 and (ws.checkpoint_dir(0, 2) / MODEL_FILE).is_file()
    return report


def test_compilation_is_paid_once_per_process_not_per_shard_or_slice(tmp_path, monkeypatch):
    """train.compile's path, run on CPU with a counting backend, on exactly the runs the `gpu` tests make (so
    the count in this module's docstring is checked where CI runs). Dynamo compiles the first batch shape
    statically and, at the next shape, one dynamic graph for all the rest; the second training's fresh model
    (as a further shard's), the resumed retraining and later slices compile nothing again. The LoRA run, of
    one batch shape, compiles once."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(training, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(training, "_compiles", lambda compile_, device: compile_)
    counts: list[tuple[str, int]] = []
    try:
        exactness_run(tmp_path / "x", "cpu", True, lambda name: counts.append((name, counter.frame_count)))
        # the retraining, as in a fresh process, compiles again: a static graph for its first batch, then the
        # dynamic one, then one for the last batch of a slice, smaller (measured here)
        after = SCRATCH_GRAPHS + RETRAIN_GRAPHS
        assert counts == [
            ("a", SCRATCH_GRAPHS),
            ("b", SCRATCH_GRAPHS),
            ("retrained", after),
            ("scratch", after),
        ]
        counts.clear()
        lora_run(tmp_path / "l", "cpu", True, lambda name: counts.append((name, counter.frame_count)))
        total = SCRATCH_GRAPHS + RETRAIN_GRAPHS + LORA_GRAPHS
        assert counts == [("first", total), ("resumed", total)]
    finally:
        torch._dynamo.reset()


TRAIN_CASES = [
    *(
        pytest.param("cpu", compile_, lora, id=f"{kind}-{mode}-cpu")
        for lora, kind in ((False, "scratch"), (True, "lora"))
        for compile_, mode in ((False, "eager"), (True, "compiled"))
    ),
    # a from-scratch model trains and resumes on a GPU in the exactness runs below
    pytest.param("cuda", False, True, id="lora-eager-cuda", marks=GPU),
    pytest.param("cuda", True, True, id="lora-compiled-cuda", marks=GPU),
]


@pytest.mark.parametrize(("device", "compile_", "lora"), TRAIN_CASES)  # CPU: this test's logic, where CI runs
def test_training_trains_and_resumes(
    make_workspace, make_records, make_params, tmp_path, device, compile_, lora
):
    if lora:
        report = lora_run(tmp_path, device, compile_)
    else:
        params = make_params(train={"device": device, "compile": compile_})
        ws = make_workspace(make_records(owners=8, per_owner=3))
        report = train_shard(ws, 0, params, progress=quiet)
        shutil.rmtree(ws.checkpoint_dir(0, 2))
        again = train_shard(ws, 0, params, progress=quiet)
        assert again.start_slice == 2 and (ws.checkpoint_dir(0, 2) / MODEL_FILE).is_file()
    _trained_on(report, device)


def _trained_on(report: ShardTrainReport, device: str) -> None:
    # a slice can hold no record (a placement's first may not): it trains nothing and reports no loss
    trained = [s for s in report.slices if s.steps]
    assert report.device == device and trained
    assert all(s.loss is not None and torch.isfinite(torch.tensor(s.loss)) for s in trained)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param((device, compile_), id=f"{mode}-{device}", marks=GPU if device == "cuda" else ())
        for device in ("cpu", "cuda")
        for compile_, mode in ((False, "eager"), (True, "compiled"))
    ],
)
def exactness(request, tmp_path_factory) -> Exactness:
    """One exactness run per device and mode, shared by the tests below (on a GPU: one compilation of it)."""
    device, compile_ = request.param
    return exactness_run(tmp_path_factory.mktemp("exactness"), device, compile_)


def test_device_training_trains_and_resumes_a_from_scratch_model(exactness):
    reports = exactness.reports
    for name in ("a", "b", "scratch"):
        assert reports[name].start_slice == 0
        _trained_on(reports[name], exactness.device)
    assert reports["retrained"].start_slice == 1 and len(reports["retrained"].slices) == 2


def test_two_trainings_on_the_device_give_the_same_bytes(exactness):
    """With train.deterministic (the default): compiled, the second training's first batch is served by the
    dynamic graph compiled during the first training's second batch, where the first training's ran the static
    graph; equal bytes say the two graphs computed alike."""
    assert exactness.files["a"] == exactness.files["b"]


def test_forgetting_on_the_device_equals_training_from_scratch(exactness):
    """The exactness guarantee where training runs: retraining after a deletion (resumed from the last
    untouched slice's checkpoint, fused AdamW state included) gives the bytes of a training from scratch without
    the deleted owner."""
    files, M = exactness.files, MODEL_FILE
    assert files["retrained"] == files["scratch"]
    assert files["retrained"][(0, M)] == files["b"][(0, M)]
    assert files["retrained"][(2, M)] != files["b"][(2, M)]  # the deletion changed the later slices


@pytest.mark.gpu
@CUDA
def test_batched_ensembles_on_cuda_equal_their_loops(tmp_path):
    from sisaflow.inference.ensemble import Ensemble
    from sisaflow.inference.lora_runners import BatchedLora, PeftLoop
    from tests.unit.inference.test_stacked import IdTokenizer, _ids, _models
    from tests.unit.models.test_lora import LPS, _lora_ensembles

    models = [m.cuda() for m in _models(tie=False)]
    fast = Ensemble(models, [1.0, 2.0, 3.0], "mixture", IdTokenizer())
    loop = Ensemble(models, [1.0, 2.0, 3.0], "mixture", IdTokenizer(), batched=False)
    ids = _ids(2, 20).cuda()
    assert float((fast(ids).logits - loop(ids).logits).abs().max()) <= 1e-3
    batched, peft_loop = (e.cuda() for e in _lora_ensembles(save_tiny_base(tmp_path / "base"), LPS[1]))
    assert isinstance(batched.runner, BatchedLora) and isinstance(peft_loop.runner, PeftLoop)
    x = torch.randint(0, 256, (2, 12), device="cuda")
    assert float((batched(x).logits - peft_loop(x).logits).abs().max()) <= 1e-3
    from sisaflow.inference.lora_runners import stacked_lora
    from sisaflow.models.pretrained import load_base_model
    from tests.unit.models.test_lora import _random_adapters

    base_dir = tmp_path / "base"
    stacked = stacked_lora(
        load_base_model(str(base_dir)), _random_adapters(base_dir, LPS[1], 3), 2.0, 96
    ).cuda()
    lean = Ensemble([], [1.0, 2.0, 3.0], "mixture", batched.tokenizer, runner=stacked, context_length=96)
    # its own Llama forward rounds differently from transformers' in float32 (equal in float64: test_lora.py)
    assert float((lean(x).logits - peft_loop(x).logits).abs().max()) <= 5e-3


@pytest.mark.gpu
@CUDA
def test_a_served_ensemble_on_cuda_in_bfloat16(make_served, make_records, make_params):
    """`Ensemble.load(device="cuda", dtype=bfloat16)`, as `generate --device cuda --dtype bfloat16` serves: batched
    prompts run, transformers' generate() over it picks the same tokens and runs beam search, and the
    log-likelihood stays near float32 on the CPU."""
    from sisaflow.inference.ensemble import Ensemble
    from sisaflow.inference.hf import EnsembleForCausalLM

    ws = make_served(make_records(owners=3, per_owner=2), make_params(sharding={"shards": 1, "slices": 1}))
    cpu, gpu = Ensemble.load(ws), Ensemble.load(ws, device="cuda", dtype=torch.bfloat16)
    assert gpu.weights.dtype == torch.float64 and gpu.weights.device.type == "cuda"
    prompts = ["Question: who?", "Hi"]  # of two lengths: both paths pass the same padding mask
    graphed = gpu.generate(prompts, max_new_tokens=8)  # the served path on CUDA: the captured decode step
    decoder = gpu.graph_decoder()
    assert len(graphed) == 2 and decoder is not None and decoder.captured
    # transformers drives the eager step: compared with the eager loop, whose kernels it shares (in bf16 the
    # graph's whole-capacity attention and float32 mixture may break a near tie otherwise)
    gpu.cuda_graphs = False
    texts = gpu.generate(prompts, max_new_tokens=8)
    model = EnsembleForCausalLM(gpu)
    batch = model.encode(prompts, 8)
    assert batch["input_ids"].device.type == "cuda"
    width = batch["input_ids"].shape[1]
    assert model.decode(model.generate(**batch, max_new_tokens=8, do_sample=False), width) == texts
    assert model.generate(**batch, max_new_tokens=4, num_beams=3, num_return_sequences=3).shape[0] == 6
    text = "Question: who wrote it?"
    assert gpu.score(text)["log_likelihood"] == pytest.approx(cpu.score(text)["log_likelihood"], rel=0.02)
