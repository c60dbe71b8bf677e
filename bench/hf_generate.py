"""What decoding through transformers' `generate()` (`sisaflow.inference.hf.EnsembleForCausalLM`) costs against
`Ensemble.generate`, over the same ensemble, in one run.

    python bench/hf_generate.py [--shards 4] [--batch 16] [--new-tokens 64] [--repeats 3] [--device cpu]

Constituents are freshly initialised at the default ModelParams with the byte tokenizer (speed does not depend on
the weights), stacked as served. Each run: a batch of prompts of 32 random tokens, then `--new-tokens` new tokens
(end-of-text suppressed in both, so every run makes the same number of tokens). Prints new tokens per second over
all rows (median of the repeats, after one warm-up) for greedy decoding both ways, and for transformers' sampling
(top-p 0.9) and beam search (4 beams), whose costs `Ensemble.generate` has no counterpart for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sisaflow.core.config import ModelParams
from sisaflow.inference.ensemble import Ensemble
from sisaflow.inference.hf import EnsembleForCausalLM
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer

PROMPT = 32


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats`, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    tok = load_tokenizer("byte")
    mp = ModelParams()
    models = [build_model(mp, tok.vocab_size, tok.eos_id, seed=s).eval() for s in range(args.shards)]
    ens = Ensemble(models, [1.0] * args.shards, "mixture", tok).to(device)
    model = EnsembleForCausalLM(ens)
    g = torch.Generator().manual_seed(0)
    prompts = [
        bytes(torch.randint(32, 127, (PROMPT,), generator=g).tolist()).decode() for _ in range(args.batch)
    ]
    batch = model.encode(prompts)
    new = args.new_tokens
    hf = dict(max_new_tokens=new, min_new_tokens=new)  # never stop at end-of-text: equal work every run

    def ours() -> None:
        # Ensemble.generate stops a row at end-of-text; suppress it in the weights-free way: an eos id no row
        # can produce
        ens.tokenizer.eos_id = -1
        try:
            ens.generate(prompts, max_new_tokens=new)
        finally:
            ens.tokenizer.eos_id = tok.eos_id

    rows = {
        "Ensemble.generate, greedy": ours,
        "transformers generate, greedy": lambda: model.generate(**batch, do_sample=False, **hf),
        "transformers generate, top-p 0.9": lambda: model.generate(**batch, do_sample=True, top_p=0.9, **hf),
        "transformers generate, 4 beams": lambda: model.generate(**batch, do_sample=False, num_beams=4, **hf),
    }
    print(
        f"ensemble of S={args.shards} default models (byte h{mp.hidden_size} x{mp.layers}), batch {args.batch}, "
        f"{new} new tokens, {device}, {torch.get_num_threads()} threads"
    )
    base = None
    for name, fn in rows.items():
        seconds = timed(fn, args.repeats, device)
        rate = args.batch * new / seconds
        base = base or rate
        print(f"{name:<36} {rate:>9.0f} tokens/s   {rate / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
