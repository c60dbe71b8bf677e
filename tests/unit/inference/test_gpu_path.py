"""The CUDA training path: bf16 autocast, fused AdamW, optional torch.compile; and the CPU path left exactly as it
was. The choices are checked on CPU; the runs themselves carry the `gpu` marker and skip without CUDA."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import sisaflow.training.loop as training
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer
from sisaflow.training.checkpoint import MODEL_FILE, OPTIMIZER_FILE
from sisaflow.training.loop import train_shard
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


def test_compilation_is_paid_once_per_process_not_per_shard_or_slice(
    make_workspace, make_records, make_params, monkeypatch
):
    """train.compile's path, run on CPU with a counting backend: two shards of three slices, records of varying
    length. Dynamo compiles the first batch width statically and then one dynamic graph; neither the second
    shard's fresh model nor later slices compile again."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(training, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(training, "_compiles", lambda compile_, device: compile_)
    ws = make_workspace(make_records(owners=12, per_owner=2), shards=2)
    params = make_params(train={"compile": True}, sharding={"shards": 2})
    first = train_shard(ws, 0, params, progress=quiet)
    after_first = counter.frame_count
    second = train_shard(ws, 1, params, progress=quiet)
    assert len(first.slices) == len(second.slices) == 3
    assert 1 <= after_first <= 2, (
        after_first
    )  # forward and backward are one frame; a static then a dynamic one
    assert counter.frame_count == after_first  # shard 1: nothing compiled again
    torch._dynamo.reset()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
)  # the CPU run keeps this test's own logic checked where CI runs
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("lora", [False, True], ids=["scratch", "lora"])
def test_training_trains_and_resumes(
    make_workspace, make_records, make_params, tmp_path, device, compile_, lora
):
    model = {}
    if lora:
        model = {"tokenizer": "base", "base": str(save_tiny_base(tmp_path / "base"))}
    params = make_params(train={"device": device, "compile": compile_}, model=model)
    ws = make_workspace(make_records(owners=8, per_owner=3))
    report = train_shard(ws, 0, params, progress=quiet)
    # a slice can hold no record (this placement's first does): it trains nothing and reports no loss
    trained = [s for s in report.slices if s.steps]
    assert report.device == device and trained
    assert all(s.loss is not None and torch.isfinite(torch.tensor(s.loss)) for s in trained)
    shutil.rmtree(ws.checkpoint_dir(0, 2))
    again = train_shard(ws, 0, params, progress=quiet)  # resumes a fused AdamW: its step lives on the GPU
    assert again.start_slice == 2 and (ws.checkpoint_dir(0, 2) / MODEL_FILE).is_file()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_forgetting_on_the_device_equals_training_from_scratch(
    make_workspace, make_records, make_params, device, compile_
):
    """The exactness guarantee where training runs: with train.deterministic (the default) two trainings give
    the same bytes, and retraining after a deletion (resumed from the last untouched slice's checkpoint, fused
    AdamW state included) gives the bytes of a training from scratch without the deleted owner."""
    from sisaflow.data.corpus import from_table, read_table, to_table, write_table
    from sisaflow.data.sharding import read_slice, shard_corpus
    from tests.unit.training.test_loop import ckpt_files as files  # every checkpoint file, slice by slice

    params = make_params(train={"device": device, "compile": compile_})
    records = make_records(owners=12, per_owner=3)
    a, b = make_workspace(records, name="a"), make_workspace(records, name="b")
    assert all(read_slice(a, 0, k) for k in range(3))  # every slice trains
    for ws in (a, b):
        train_shard(ws, 0, params, progress=quiet)

    assert files(a) == files(b)
    owner = read_slice(a, 0, 1)[0].owner
    kept = [r for r in from_table(read_table(a.corpus_file)) if r.owner != owner]
    write_table(a.corpus_file, to_table(kept))
    shard_corpus(a, params.sharding)
    assert train_shard(a, 0, params, progress=quiet).start_slice == 1
    scratch = make_workspace(kept, name="scratch")
    train_shard(scratch, 0, params, progress=quiet)
    assert files(a) == files(scratch) and files(a)[(0, MODEL_FILE)] == files(b)[(0, MODEL_FILE)]
    assert files(a)[(2, MODEL_FILE)] != files(b)[(2, MODEL_FILE)]  # the deletion changed the later slices


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
    texts = gpu.generate(prompts, max_new_tokens=8)
    assert len(texts) == 2
    model = EnsembleForCausalLM(gpu)
    batch = model.encode(prompts, 8)
    assert batch["input_ids"].device.type == "cuda"
    width = batch["input_ids"].shape[1]
    assert model.decode(model.generate(**batch, max_new_tokens=8, do_sample=False), width) == texts
    assert model.generate(**batch, max_new_tokens=4, num_beams=3, num_return_sequences=3).shape[0] == 6
    text = "Question: who wrote it?"
    assert gpu.score(text)["log_likelihood"] == pytest.approx(cpu.score(text)["log_likelihood"], rel=0.02)
