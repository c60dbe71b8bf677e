"""Issue 18's generation figures: the ensemble's decode step replayed from a CUDA graph, against one model under
transformers' own fast path and against today's eager stacked step, with the numerics of the graph path.

    PYTHONPATH=src:. python bench/graph_generate.py --out DIR [--only scratch,lora] [--budget-s 300]
    PYTHONPATH=src:. python bench/graph_generate.py --smoke --out DIR   # CPU, tiny shapes (a unit test runs it)

Sections (in the order given; one that would start after --budget-s is skipped and says so):
- scratch: S from-scratch constituents of the SmolLM2-135M shape (hidden 576, 30 layers, 9 heads, full key/value
  heads as the library builds them, intermediate 1536, tied embeddings, GPT-2's 50,257 tokens), bf16.
- lora: S rank-8 adapters (q_proj, v_proj) over a random base of that shape with SmolLM2's 3 key/value heads and
  49,152 tokens, served by `stacked_lora` (the base's weights shared).

Per section and S = 8, 4, 2, 1 (largest first), batch 16, a 32-token prompt, 64 new tokens, greedy on the
mixture, never stopping at end-of-text (every run makes the same tokens):
- `one`: one model alone (a constituent; for LoRA the base) through transformers' `generate()` with
  `cache_implementation="static"`, which on CUDA compiles the forward (`torch.compile`, mode reduce-overhead:
  CUDA graphs): the fast path a user would pick for one model. Measured once per section: it does not depend on S.
- `graph`: the ensemble through `GraphDecoder` (its prefill and decode step captured once as CUDA graphs, the
  mixture in float32).
- `compiled` (S in the setup's `compiled` sizes): the same with the step compiled by torch.compile (inductor fuses
  its elementwise work) before capture (`ensemble.compile_decode`); its compilation is timed apart.
- `eager` (S in the setup's `eager` sizes): today's stacked step launched from Python per token (what issue 18's
  baseline measured: 292 tokens/s at S=8); 0 in the table where not measured.
Each run is warmed up once at its full length (compilation and capture happen there), then timed `repeats`
times, the runs taking turns; the median is reported. Each row also gives the prefill and one decode step
replayed alone, the bytes a decode step reads (weights and cache) and the step time the H200's 4.3 TB/s would
allow for them: how far the step is from the memory-bandwidth bound.

Numerics (S in the setup's `numerics` sizes): the loop over the constituents (transformers models, or the peft
loop for LoRA; the mixture in float64) decodes greedily; the graph decoder is then fed the loop's tokens
(teacher forcing) and its log-probabilities are compared at every step: max and mean absolute difference over the
whole vocabulary, and over the loop's chosen tokens; the share of steps whose greedy token differs; and whether
free-running graph generation gives the loop's tokens row by row.

Writes DIR/graph.json after every measurement (a timeout keeps what was measured) and DIR/graph.md at the end.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO), str(REPO / "bench")]

from device_record import RunRecord  # noqa: E402
from ensemble_speed import generate_stacked, random_adapters  # noqa: E402

from sisaflow.core.config import LoraParams, ModelParams  # noqa: E402
from sisaflow.inference.combine import combine_log_probs  # noqa: E402
from sisaflow.inference.graphed import GraphDecoder  # noqa: E402
from sisaflow.inference.stacked import StackedLlama  # noqa: E402

HBM_BYTES_PER_S = 4.3e12
"""The H200's memory bandwidth (NVIDIA's figure), against which the bound is stated."""


@dataclass(frozen=True)
class Setup:
    hidden: int
    layers: int
    heads: int
    base_kv_heads: int
    intermediate: int
    tokenizer: str
    base_vocab: int
    context: int
    batch: int
    prompt: int
    new: int
    repeats: int
    sizes: tuple[int, ...]
    numerics: tuple[int, ...]
    numerics_new: int
    compiled: tuple[int, ...]
    compile_backend: str
    eager: tuple[int, ...]


SHAPE = dict(
    hidden=576, layers=30, heads=9, base_kv_heads=3, intermediate=1536, tokenizer="gpt2", base_vocab=49152
)
# eager and a compiled step only at S=8 (the goal's row; an eager run costs 3.5 s there, a compilation tens of
# seconds): the whole fits its share of a 15-minute device session (bench/gpu_session.sh states the plan)
FULL = Setup(
    **SHAPE,  # type: ignore[arg-type]
    context=1024,
    batch=16,
    prompt=32,
    new=64,
    repeats=2,
    sizes=(8, 4, 2, 1),
    numerics=(8, 2),
    numerics_new=32,
    compiled=(8,),
    compile_backend="inductor",
    eager=(8,),
)
# aot_eager: traced and functionalised as inductor's input is, without a C++ compilation per run of the test
SMOKE = Setup(32, 2, 2, 1, 64, "byte", 257, 128, 2, 6, 6, 1, (2, 1), (2,), 5, (2,), "aot_eager", (2,))
NEVER = -1
"""An end-of-text id no token has: every run makes all its new tokens."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rates(
    runs: dict[str, Callable[[], object]], tokens: int, repeats: int, device: torch.device
) -> dict:
    """Tokens per second of each run (median of `repeats`), after one full warm-up each; the runs take turns."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(max(1, repeats)):
        for k, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[k].append(time.perf_counter() - start)
    return {k: tokens / statistics.median(t) for k, t in times.items()}


def hf_static(model, prompt: torch.Tensor, new: int) -> Callable[[], object]:
    """One model through transformers' generate() with a static cache (compiled on CUDA), `new` tokens."""
    mask = torch.ones_like(prompt)

    def run():
        return model.generate(
            input_ids=prompt,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )

    return run


def step_bytes(stacked: StackedLlama, batch: int, capacity: int) -> dict:
    """Bytes one decode step reads at least: the weights (an untied embedding only gathers `batch` rows, so it is
    left out; a tied one is read whole as the output head) and every layer's keys and values over the capacity
    (`static_step` attends grouped heads without repeating them); and the step time HBM_BYTES_PER_S allows."""
    weights = sum(p.numel() * p.element_size() for p in stacked.parameters())
    if stacked.lm_head is not None:
        weights -= stacked.embed.numel() * stacked.embed.element_size()
    size = stacked.embed.element_size()
    cache = (
        2
        * stacked.num_layers
        * stacked.num_models
        * batch
        * stacked.kv_heads
        * capacity
        * stacked.head_dim
        * size
    )
    return {
        "weights_bytes": weights,
        "cache_bytes": cache,
        "bound_ms": 1e3 * (weights + cache) / HBM_BYTES_PER_S,
    }


def replay_ms(dec: GraphDecoder, device: torch.device, steps: int) -> dict:
    """Milliseconds of one prefill and of one decode step of the decoder's last shape, replayed alone (what a
    generation's rate mixes): the decode step is what the bandwidth bound is compared with. Each prefill puts
    the position back at the prompt's end, so the decode steps stay inside the cache, as a generation's do."""
    shape = dec._shapes[dec.captured[-1]]
    steps = min(steps, shape.capacity - shape.width - 1)
    times = {}
    for name, count in (("prefill", 3), ("decode", steps)):
        sync(device)
        start = time.perf_counter()
        for _ in range(count):
            dec._run(shape, name)
        sync(device)
        times[name] = 1e3 * (time.perf_counter() - start) / count
    assert int(shape.position) == shape.width + steps <= shape.capacity - 1  # never past the cache
    return {"prefill_ms": times["prefill"], "decode_step_ms": times["decode"]}


@torch.no_grad()
def reference(
    runner, weights: torch.Tensor, prompt: torch.Tensor, new: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop's greedy tokens (B, N) and combined log-probabilities (B, N, V), the mixture in float64."""
    logits, cache = runner(prompt, use_cache=True, logits_to_keep=1)
    tokens, lps = [], []
    for step in range(new):
        lp = combine_log_probs(torch.log_softmax(logits[:, :, -1].double(), dim=-1), weights, "mixture")
        tokens.append(lp.argmax(-1, keepdim=True))
        lps.append(lp)
        if step + 1 < new:
            logits, cache = runner(tokens[-1], cache=cache, use_cache=True, logits_to_keep=1)
    return torch.cat(tokens, dim=1), torch.stack(lps, dim=1)


@torch.no_grad()
def numerics(dec: GraphDecoder, runner, weights: torch.Tensor, prompt: torch.Tensor, new: int) -> dict:
    want_tokens, want = reference(runner, weights, prompt, new)
    got = dec.log_probs_along(prompt, None, want_tokens).double()
    diff = (got - want).abs()
    chosen = diff.gather(-1, want_tokens.unsqueeze(-1))
    free = dec.generate(prompt, None, new, NEVER)
    same_rows = [row == ref for row, ref in zip(free, want_tokens.tolist())]
    return {
        "steps": new,
        "max_abs_logprob_diff": float(diff.max()),
        "mean_abs_logprob_diff": float(diff.mean()),
        "max_abs_chosen_diff": float(chosen.max()),
        "mean_abs_chosen_diff": float(chosen.mean()),
        "greedy_differs": float((got.argmax(-1) != want_tokens).double().mean()),
        "same_rows": sum(same_rows),
        "rows": len(same_rows),
    }


def measure(
    setup: Setup,
    device: torch.device,
    one,
    stacked_for: Callable[[int], StackedLlama],
    loop_for: Callable[[int], object],
    vocab: int,
    rows: list,
    save,
) -> None:
    """Appends a row per S (largest first) to `rows`, saving after each; `one` is the single model."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (setup.batch, setup.prompt), generator=g).to(device)
    tokens = setup.batch * setup.new
    one_rate = timed_rates({"one": hf_static(one, prompt, setup.new)}, tokens, setup.repeats, device)["one"]
    compiled = hasattr(one, "_compiled_call")
    for s in sorted(setup.sizes, reverse=True):
        stacked = stacked_for(s)
        weights = torch.full((s,), 1 / s, dtype=torch.float64, device=device)
        dec = GraphDecoder(stacked, weights, "mixture")
        runs = {"graph": functools.partial(dec.generate, prompt, None, setup.new, NEVER)}
        if s in setup.eager:
            runs["eager"] = functools.partial(generate_stacked, stacked, weights, prompt, setup.new)
        if s in setup.compiled:
            fused = GraphDecoder(
                stacked, weights, "mixture", compile=True, compile_backend=setup.compile_backend
            )
            runs["compiled"] = functools.partial(fused.generate, prompt, None, setup.new, NEVER)
            t0 = time.perf_counter()
            fused.generate(prompt, None, setup.new, NEVER)  # compiles and captures: timed apart
            compile_s = time.perf_counter() - t0
        r = timed_rates(runs, tokens, setup.repeats, device)
        (shape,) = dec.captured
        row = {
            "S": s,
            "batch": setup.batch,
            "one": one_rate,
            "one_compiled": compiled,
            **r,
            "graph_vs_one": r["graph"] / one_rate,
            "graph_vs_eager": r["graph"] / r["eager"] if "eager" in r else None,
            "captured": dec.capture,
            "capture_failure": dec.failure,  # why the decoder went eager, if it did
            "prompt_width": shape[1],
            "capacity": shape[2],
            **step_bytes(stacked, setup.batch, shape[2]),
        }
        if "compiled" in r:
            row["compiled_vs_one"] = r["compiled"] / one_rate
            row["compile_seconds"] = compile_s
            row["compiled_failure"] = fused.failure
        row.update(replay_ms(dec, device, setup.new))
        row["step_vs_bound"] = row["decode_step_ms"] / row["bound_ms"]
        rows.append(row)
        save()
        print(
            f"  S={s}: graph {r['graph']:,.0f} tok/s, {row['graph_vs_one']:.2f}x one model ({one_rate:,.0f}), "
            f"decode step {row['decode_step_ms']:.2f} ms, bound {row['bound_ms']:.2f} ms",
            flush=True,
        )
        if s in setup.numerics:
            row["numerics"] = numerics(dec, loop_for(s), weights, prompt, setup.numerics_new)
            save()
            print(f"    numerics: {row['numerics']}", flush=True)
        del stacked, dec
        if device.type == "cuda":
            torch.cuda.empty_cache()


def scratch_section(setup: Setup, device: torch.device, dtype: torch.dtype, rows: list, save) -> None:
    from sisaflow.inference.runners import ModelLoop
    from sisaflow.models.scratch import build_model
    from sisaflow.models.tokenizer import load_tokenizer

    mp = ModelParams(
        tokenizer=setup.tokenizer,  # type: ignore[arg-type]
        hidden_size=setup.hidden,
        layers=setup.layers,
        heads=setup.heads,
        intermediate_size=setup.intermediate,
        context_length=setup.context,
        tie_embeddings=True,
    )
    tok = load_tokenizer(mp.tokenizer)
    models = [
        build_model(mp, tok.vocab_size, tok.eos_id, seed=i).to(device=device, dtype=dtype).eval()
        for i in range(max(setup.sizes))
    ]
    measure(
        setup,
        device,
        models[0],
        lambda s: StackedLlama.from_models(models[:s]),
        lambda s: ModelLoop(models[:s]),
        tok.vocab_size,
        rows,
        save,
    )


def lora_section(setup: Setup, device: torch.device, dtype: torch.dtype, tmp: Path, rows: list, save) -> None:
    from sisaflow.inference.lora_runners import PeftLoop, stacked_lora
    from sisaflow.models.pretrained import load_base_model
    from tests.lora_base import save_random_base

    base = save_random_base(
        tmp / "base",
        scale=1.0,
        vocab_size=setup.base_vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.base_kv_heads,
        max_position_embeddings=setup.context,
        tie_word_embeddings=True,
    )
    lp = LoraParams()
    mp = ModelParams(tokenizer="base", base=str(base), lora=lp)
    model = load_base_model(str(base))
    adapters = random_adapters(model, lp, max(setup.sizes))
    one = copy.deepcopy(model).to(device=device, dtype=dtype).eval()

    def stacked(s: int) -> StackedLlama:
        return stacked_lora(model, adapters[:s], lp.alpha / lp.r, setup.context).to(
            device=device, dtype=dtype
        )

    def loop(s: int):
        return PeftLoop(copy.deepcopy(model), mp, adapters[:s]).to(device=device, dtype=dtype)

    measure(setup, device, one, stacked, loop, setup.base_vocab, rows, save)


def markdown(out: dict) -> str:
    lines = [f"## Ensemble generation at graph speed (`bench/graph_generate.py`), {out['device']}", ""]
    lines.append(
        f"torch {out['torch']}, transformers {out['transformers']}; {out['dtype']}; {out['seconds']:.0f} s in all."
    )
    for key, title in (("scratch", "from-scratch constituents"), ("lora", "LoRA constituents over one base")):
        rows = out.get(key)
        if not isinstance(rows, list) or not rows:
            continue
        lines += [
            "",
            f"{title.capitalize()} (tokens/s over all {rows[0]['batch']} rows; one = one model, transformers "
            f"generate() with a static cache{', compiled' if rows[0]['one_compiled'] else ', not compiled'}):",
            "",
            "| S | one model | graph | graph, compiled step | eager (today) | graph / one | compiled / one "
            "| graph / eager | prefill ms | decode step ms | bound ms | step / bound |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in sorted(rows, key=lambda r: r["S"]):
            fused = (
                (
                    f"{r['compiled']:,.0f} ({r['compile_seconds']:.0f} s to compile)",
                    f"{r['compiled_vs_one']:.2f}",
                )
                if "compiled" in r
                else ("-", "-")
            )
            lines.append(
                f"| {r['S']} | {r['one']:,.0f} | {r['graph']:,.0f} | {fused[0]} | {r.get('eager', 0):,.0f} "
                f"| {r['graph_vs_one']:.2f} | {fused[1]} | {r['graph_vs_eager'] or 0:.1f} | {r['prefill_ms']:.3g} "
                f"| {r['decode_step_ms']:.3g} | {r['bound_ms']:.3g} | {r['step_vs_bound']:.3g} |"
            )
        nums = [r for r in rows if "numerics" in r]
        if nums:
            lines += [
                "",
                "Against the loop (teacher-forced along its greedy tokens; absolute log-probability differences):",
                "",
                "| S | steps | max, all tokens | mean, all tokens | max, chosen | mean, chosen | greedy differs | same rows |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for r in sorted(nums, key=lambda r: r["S"]):
                n = r["numerics"]
                lines.append(
                    f"| {r['S']} | {n['steps']} | {n['max_abs_logprob_diff']:.3g} | {n['mean_abs_logprob_diff']:.3g} "
                    f"| {n['max_abs_chosen_diff']:.3g} | {n['mean_abs_chosen_diff']:.3g} "
                    f"| {n['greedy_differs']:.1%} | {n['same_rows']} of {n['rows']} |"
                )
    for k in sorted(k for k in out if k.endswith("_error") or str(out[k]).startswith("skipped")):
        lines += ["", f"{k}: {out[k]}"]
    return "\n".join(lines) + "\n"


SECTIONS = ("scratch", "lora")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing"
    )
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no section after this many seconds")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(only) - set(SECTIONS):
        ap.error(f"--only: choose from {', '.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --smoke to check the script on CPU")
    setup = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    out_dir = Path(args.out)
    record = RunRecord(
        out_dir / "graph.json",
        device,
        dtype=str(dtype).removeprefix("torch."),
        setup=asdict(setup),
        smoke=args.smoke,
    )
    out, save = record.out, record.save
    with tempfile.TemporaryDirectory() as tmp:
        for section, key in record.sections(only, args.budget_s):
            out[key] = []
            with record.kept(key, strict=args.smoke):
                if section == "scratch":
                    scratch_section(setup, device, dtype, out[key], save)
                else:
                    lora_section(setup, device, dtype, Path(tmp), out[key], save)
    save()
    text = markdown(out)
    (out_dir / "graph.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
