"""bench/lora_quality.py on one GPU, on the whole TOFU corpus: S = 8 and 16, R = 8, SmolLM2-135M-Instruct.

    PYTHONPATH=src:. python bench/lora_gpu.py --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/lora
    PYTHONPATH=src:. python bench/lora_gpu.py --smoke --out DIR    # a tiny random base on CPU (a unit test runs it)

Needs torch, transformers, peft, pyarrow and gguf only (the GPU machine has no Ray, Prefect or DVC): the library's
own train_shard, registry and Ensemble, called in this process. The base arrives as the GGUF (98 MB, in two halves
over two calls: bench/smollm2_gpu.sh) and is converted here once (sisaflow.models.base_setup.convert_gguf), since every
shard's training loads the base and a converted directory loads in a second where the GGUF takes 15 s.

Time plan on one H200 (8 minutes in all): conversion ~20 s; zero-shot ~10 s; each layout trains 456k tokens (4,000
records x ~57 tokens x 2 epochs) and is evaluated (200 retained, 200 never-seen records, 40 answers, every
rule of combining); the S=8 and S=16 forgets. No layout starts after --budget-s (default 400 s), and lora.json is
rewritten after every layout, so a timeout keeps what was measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
)  # before the first GPU matmul (train.deterministic)

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO), str(REPO / "bench")]

import lora_quality as lq  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (or --base a converted directory)")
    ap.add_argument("--base", help="a converted base directory (skips the conversion)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument(
        "--smoke", action="store_true", help="tiny random base on CPU, 4 authors: checks this script"
    )
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        return lq.main(["--smoke", "--out", str(out)])
    import torch

    if not torch.cuda.is_available():
        print("lora_gpu: no CUDA device here; use --smoke on a CPU", file=sys.stderr)
        return 2
    base = args.base
    if base is None:
        if not args.gguf:
            print("lora_gpu: give --gguf FILE or --base DIR", file=sys.stderr)
            return 2
        from sisaflow.models.base_setup import convert_gguf

        base = "/tmp/smollm2-converted"
        if not Path(base, "config.json").is_file():
            t0 = time.perf_counter()
            convert_gguf(Path(args.gguf).resolve(), Path(base))
            print(f"lora_gpu: converted the GGUF in {time.perf_counter() - t0:.1f} s", flush=True)
    return lq.main(
        [
            "--base", base, "--out", str(out), "--authors", "200", "--shards", "8,16", "--slices", "8",
            "--device", "cuda", "--threads", "8", "--eval-records", "200", "--questions", "40",
            "--budget-s", str(args.budget_s),
        ]
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
