"""GPU check of the library's training and ensemble code, on one CUDA device, without Ray, Prefect or DVC.

Run on the lent GPU machine (it has torch, transformers, pyarrow, safetensors; not ray/prefect/dvc):
    PYTHONPATH=src:. python bench/gpu_check.py [--shards 4] [--slices 4] [--out FILE]
It imports the shipped TOFU corpus into a temporary workspace, shards it as params.yaml says, trains every shard
with `train_shard` on CUDA (the same function Ray workers run), trains one shard a second time to see whether
CUDA training is bitwise repeatable, and measures ensemble generation. Prints figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace
    from sisaflow.data.corpus import Exclusions, import_corpus
    from sisaflow.data.sharding import shard_corpus
    from sisaflow.inference.ensemble import Ensemble
    from sisaflow.inference.registry import build_registry
    from sisaflow.training.checkpoint import weights_hash
    from sisaflow.training.loop import train_shard

    params = Params.load(REPO / "params.yaml")
    raw = params.to_dict()
    raw["train"]["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    params = Params.from_dict(raw)
    out: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    import transformers

    out["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        import_corpus(REPO / params.corpus.path, params.corpus, ws.corpus_file, Exclusions())
        shard_corpus(ws, params.sharding)
        shards = []
        for s in params.sharding.shard_ids:
            t0 = time.perf_counter()
            rep = train_shard(ws, s, params, progress=lambda m: None)
            dt = time.perf_counter() - t0
            shards.append(
                {
                    "shard": s,
                    "tokens": rep.tokens,
                    "seconds": round(dt, 2),
                    "tokens_per_s": round(rep.tokens / dt),
                    "final_loss": rep.slices[-1].loss,
                }
            )
            print(json.dumps(shards[-1]), flush=True)
        out["train"] = shards
        first = weights_hash(ws.checkpoint_dir(0, params.sharding.slices - 1))
        import shutil

        shutil.rmtree(ws.model_dir(0))
        train_shard(ws, 0, params, progress=lambda m: None)
        out["cuda_training_bitwise_repeatable"] = first == weights_hash(
            ws.checkpoint_dir(0, params.sharding.slices - 1)
        )
        build_registry(ws, params)
        ens = Ensemble.load(ws, device=params.train.device)
        prompt = "Question: What genre is the author Jaime Vasquez known for?\nAnswer:"
        ens.generate(prompt, 8)
        t0 = time.perf_counter()
        text = ens.generate(prompt, 200)
        dt = time.perf_counter() - t0
        n = len(ens.tokenizer.encode(text))
        out["generate"] = {
            "new_tokens": n,
            "seconds": round(dt, 3),
            "tokens_per_s": round(n / dt, 1),
            "constituents": len(ens.shards),
            "text": text[:200],
        }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
