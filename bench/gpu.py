"""Issue 5's GPU figures, on one CUDA device, calling the library directly (no Ray, Prefect or DVC).

    PYTHONPATH=src:. python bench/gpu.py --out DIR [--budget-s 420]
        [--only train,ensemble,lora-ensemble,lora-train,train-profile]
        [--train-modes eager,compiled] [--compiled-fast] [--profile-budget-s 240] [--profile-steps 5]
        [--profile-sweep strict-padded,nondeterministic,strict-unpadded,strict-inductor-free]
    PYTHONPATH=src:. python bench/gpu.py --smoke --out DIR   # CPU, tiny shapes: checks this script (a unit test)

Sections, in this order unless --only orders them (a section that would start after --budget-s seconds is
skipped and says so):
- train: per-shard training tokens/s of the library's `train_shard` (what a Ray worker runs) against a bare torch
  loop on the same model and batch: a from-scratch Llama of the SmolLM2-135M shape (hidden 576, 30 layers,
  9 heads, intermediate 1536, tied embeddings, GPT-2's 50,257 tokens; full key/value heads, as the library builds
  them), batches of 32 x 1024 tokens, bf16 autocast, fused AdamW, gradient clipping; eager, then torch.compile.
  The library trains two workspaces in turn (fresh model each, as two shards would): the first pays CUDA start
  and compilation, the second shows what a further shard costs. Model FLOP utilisation counts 6 x the matmul
  parameters per token (the issue's convention), and also with attention (12 x layers x hidden x sequence).
  train.deterministic false (no deterministic algorithms) is measured eager, and compiled with --compiled-fast.
- ensemble: greedy generation of an S-model ensemble, S = 8, 4, 2, 1 (the goal's S=8 first), batch 16, 64 new
  tokens, bf16: one model, the Python loop over S models (what Ensemble does with ensemble.batched false) and
  StackedLlama.
- lora-ensemble: the same for LoRA constituents (r 8 on q_proj, v_proj) over a random frozen base of the
  SmolLM2-135M shape (3 key/value heads): base alone, the peft loop, BatchedLora (transformers' base forward over
  S times the rows) and stacked_lora (StackedLlama's forward with shared base weights: what Ensemble serves).
- lora-train: per-shard LoRA training, the library against a bare peft loop, eager.
- train-profile (bench/train_profile.py): where compiled training's time goes, the torch profiler's top kernels of
  the bare loop (train.deterministic false), the bare loop under the library's settings and the library's
  train_shard, in one run; then a sweep of settings (tokens/s, and whether two trainings are bitwise equal).
  About 4.5 minutes at FULL on an H200 with the default sweep (three compilations of about 60 s; the
  estimate is in bench/train_profile.py). It writes DIR/train_profile.md as soon as each variant is measured.

Generation rates are the median of 2 timed runs after a 4-token warm-up of each. Writes DIR/gpu.json after every
measurement (an ensemble row as soon as it is measured; a timeout keeps what was measured) and DIR/gpu.md at the
end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# cuBLAS reads this once, at the process's first GPU matmul: set before anything runs, so the bare loop and the
# library share one cuBLAS set-up and train.deterministic (the default) gets deterministic matmuls
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO), str(REPO / "bench")]

from device_record import RunRecord, device_name  # noqa: E402
from ensemble_speed import lora_rows, scratch_rows  # noqa: E402

from sisaflow.core.config import ModelParams, Params, ShardingParams  # noqa: E402
from sisaflow.core.paths import Workspace  # noqa: E402
from sisaflow.data.corpus import Record, content_hash, to_table, write_table  # noqa: E402
from sisaflow.data.sharding import shard_corpus  # noqa: E402
from sisaflow.models.scratch import build_model  # noqa: E402
from sisaflow.models.tokenizer import load_tokenizer  # noqa: E402
from sisaflow.training.checkpoint import weights_hash  # noqa: E402
from sisaflow.training.loop import derive_seed, train_shard  # noqa: E402

# dense bf16 peak without sparsity, by device name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass(frozen=True)
class Setup:
    """Shapes and sizes of one run of the script."""

    tokenizer: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    base_vocab: int
    context: int
    batch: int
    steps: int
    warmup: int
    gen_batch: int
    gen_new: int
    gen_repeats: int
    sizes: tuple[int, ...]


FULL = Setup("gpt2", 576, 30, 9, 3, 1536, 49152, 1024, 32, 20, 3, 16, 64, 2, (1, 2, 4, 8))
SMOKE = Setup("byte", 32, 2, 2, 1, 64, 257, 48, 4, 3, 1, 2, 4, 1, (1, 2))


def model_params(setup: Setup) -> ModelParams:
    return ModelParams(
        tokenizer=setup.tokenizer,  # type: ignore[arg-type]
        hidden_size=setup.hidden,
        layers=setup.layers,
        heads=setup.heads,
        intermediate_size=setup.intermediate,
        context_length=setup.context,
        tie_embeddings=True,
    )


def params_for(
    setup: Setup, device: str, compile_: bool, model: dict | None = None, deterministic: bool = True
) -> Params:
    """One shard, one slice, one epoch of setup.steps full batches; no warm-up of the learning rate."""
    raw = Params().to_dict()
    raw["sharding"] = {"shards": 1, "slices": 1}
    raw["model"] = model or asdict(model_params(setup))
    raw["train"].update(
        device=device,
        compile=compile_,
        deterministic=deterministic,
        batch_size=setup.batch,
        epochs_per_slice=1,
        warmup_steps=0,
        learning_rate=3e-4,
        log_every=10**6,
    )
    return Params.from_dict(raw)


def long_records(setup: Setup, tokenizer, count: int, salt: str) -> list[Record]:
    """`count` records of at least setup.context tokens each, cut from the shipped TOFU text (real English, so
    the GPT-2 tokenizer sees ordinary word lengths); one owner per record."""
    lines = [
        json.loads(line)
        for line in (REPO / "data" / "tofu" / "records.jsonl").read_text().splitlines()
        if line.strip()
    ]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in lines]
    records, next_text = [], 0
    for n in range(count):
        parts: list[str] = []
        while len(tokenizer.encode("\n\n".join(parts))) < setup.context + 1:
            parts += [texts[(next_text + j) % len(texts)] for j in range(8)]
            next_text += 8
        text, rid = "\n\n".join(parts), f"{salt}-{n:05d}"
        records.append(Record(rid, rid, text, content_hash(rid, text)))
    return records


def workspace(root: Path, records: list[Record]) -> Workspace:
    ws = Workspace(root)
    root.mkdir(parents=True)
    write_table(ws.corpus_file, to_table(records))
    shard_corpus(ws, ShardingParams(shards=1, slices=1))
    return ws


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(model, batch: torch.Tensor, device: torch.device, compile_: bool, labels=None):
    """One step of the bare loop on one fixed batch (what anyone would write): the library's optimiser settings,
    autocast and clipping. `labels` defaults to the batch itself; bench/train_profile.py passes a tensor of its
    own (as the library's are), so that the bare loop and the library share one compiled graph."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(
        trainable, lr=3e-4, weight_decay=0.0, fused=cuda, foreach=False if not cuda else None
    )
    forward = torch.compile(model) if compile_ else model
    mask = torch.ones_like(batch)
    targets = batch if labels is None else labels
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step() -> torch.Tensor:
        with autocast:
            loss = forward(input_ids=batch, attention_mask=mask, labels=targets).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return loss.detach()

    return step


def bare_loop(model, batch: torch.Tensor, setup: Setup, device: torch.device, compile_: bool) -> dict:
    """The reference: the bare loop's steps on one fixed batch, same model, optimiser settings, autocast and
    clipping as the library. Returns tokens/s over setup.steps steps after warm-up."""
    step = bare_step(model, batch, device, compile_)
    threads = torch.get_num_threads()
    torch.set_num_threads(Params().train.threads)  # as train_shard does (it matters on CPU only)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(setup.warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(setup.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    tokens = setup.steps * batch.numel()
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds,
        "warmup_seconds": round(warm, 2),
        "final_loss": float(loss),
    }


def library_runs(
    setup: Setup, params: Params, records: list[Record], tmp: Path, label: str, runs=("first", "second")
) -> list[dict]:
    """train_shard on fresh one-shard workspaces in turn (a second as a further shard would run: the same data and
    seed, so equal weights hashes mean the training repeated bit for bit)."""
    out = []
    for run in runs:
        ws = workspace(tmp / f"{label}-{run}", records)
        t0 = time.perf_counter()
        rep = train_shard(ws, 0, params, progress=lambda m: None)
        total = time.perf_counter() - t0
        (sl,) = rep.slices
        out.append(
            {
                "run": run,
                "tokens": sl.tokens,
                "steps": sl.steps,
                "seconds": round(sl.seconds, 3),
                "tokens_per_s": sl.tokens / sl.seconds,
                "call_seconds": round(total, 2),  # with model build, encoding and the checkpoint write
                "final_loss": sl.loss,
                "deterministic": params.train.deterministic,
                "weights": weights_hash(ws.checkpoint_dir(0, 0)),
            }
        )
        shutil.rmtree(ws.root)  # a full model and optimizer state each: keep the disk for the next
    return out


def flops_per_token(model, setup: Setup) -> tuple[float, float]:
    """(6 x matmul parameters, the same plus attention's 12 x layers x hidden x sequence), per trained token."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    dense = 6.0 * linear
    return dense, dense + 12.0 * setup.layers * setup.hidden * setup.context


def utilisation(rate: float, flops: tuple[float, float], peak: float | None) -> dict:
    dense, with_attention = (rate * f for f in flops)
    return {
        "tflops": dense / 1e12,
        "tflops_with_attention": with_attention / 1e12,
        "mfu": dense / peak if peak else None,
        "mfu_with_attention": with_attention / peak if peak else None,
    }


def train_section(
    setup: Setup,
    device: torch.device,
    tmp: Path,
    peak: float | None,
    save,
    section: dict,
    compiled_fast: bool = False,
    modes: tuple[str, ...] = ("eager", "compiled"),
) -> None:
    """Fills `section` as it goes (eager, then compiled), so that a failure keeps what was measured."""
    mp = model_params(setup)
    tok = load_tokenizer(mp.tokenizer)
    steps_records = setup.batch * setup.steps
    records = long_records(setup, tok, steps_records, "train")
    first = [(tok.encode(r.text) + [tok.eos_id])[: setup.context] for r in records[: setup.batch]]
    batch = torch.tensor(first, device=device)
    section.update(model={**mp.identity(), "vocab": tok.vocab_size}, batch=[setup.batch, setup.context])
    for compile_ in [m == "compiled" for m in ("eager", "compiled") if m in modes]:
        mode = "compiled" if compile_ else "eager"
        model = build_model(mp, tok.vocab_size, tok.eos_id, derive_seed(0, "init", 0)).to(device)
        section["parameters"] = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(model, setup)
        bare = bare_loop(model, batch, setup, device, compile_)
        bare.update(utilisation(bare["tokens_per_s"], flops, peak))
        del model
        lib = library_runs(setup, params_for(setup, device.type, compile_), records, tmp, mode)
        result = {
            "bare": bare,
            "library": lib,
            "library_vs_bare": lib[-1]["tokens_per_s"] / bare["tokens_per_s"],
            "repeatable": lib[0]["weights"] == lib[1]["weights"],
        }
        if not compile_ or compiled_fast:
            # train.deterministic false; compiled only when asked: it pays a compilation of its own (63 s on an
            # H200, 2026-11-28), so it runs twice there (the second run shows the steady rate)
            fast = library_runs(
                setup,
                params_for(setup, device.type, compile_, deterministic=False),
                records,
                tmp,
                mode,
                ("fast", "fast, second") if compile_ else ("fast",),
            )
            result["library"] = lib + fast
            result["library_fast_vs_bare"] = fast[-1]["tokens_per_s"] / bare["tokens_per_s"]
        for r in result["library"]:
            r.update(utilisation(r["tokens_per_s"], flops, peak))
        section[mode] = result
        save()


def random_base(setup: Setup, directory: Path) -> Path:
    from tests.lora_base import save_random_base

    return save_random_base(
        directory,
        scale=1.0,
        vocab_size=setup.base_vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.kv_heads,
        max_position_embeddings=max(2048, setup.context),
        tie_word_embeddings=True,
    )


def lora_train_section(
    setup: Setup, device: torch.device, tmp: Path, base: Path, peak: float | None, save
) -> dict:
    from sisaflow.models.lora import build_lora_model
    from sisaflow.models.tokenizer import load_tokenizer as load

    mp = ModelParams(tokenizer="base", base=str(base), context_length=setup.context)
    tok = load(mp.tokenizer, mp.base)
    records = long_records(setup, tok, setup.batch * setup.steps, "lora")
    first = [(tok.encode(r.text) + [tok.eos_id])[: setup.context] for r in records[: setup.batch]]
    batch = torch.tensor(first, device=device)
    model = build_lora_model(mp, derive_seed(0, "init", 0), device)
    flops = flops_per_token(model, setup)
    # a frozen base does no weight-gradient matmuls: 4 x its parameters per token (forward + input gradients)
    flops = (flops[0] * 4 / 6, flops[1] - flops[0] * 2 / 6)
    bare = bare_loop(model, batch, setup, device, False)
    bare.update(utilisation(bare["tokens_per_s"], flops, peak))
    del model
    lib = library_runs(setup, params_for(setup, device.type, False, model=asdict(mp)), records, tmp, "lora")
    for r in lib:
        r.update(utilisation(r["tokens_per_s"], flops, peak))
    save()
    return {
        "bare": bare,
        "library": lib,
        "library_vs_bare": lib[-1]["tokens_per_s"] / bare["tokens_per_s"],
        "repeatable": lib[0]["weights"] == lib[1]["weights"],
    }


def largest_first(setup: Setup) -> tuple[int, ...]:
    """S in decreasing order: the S=8 row (the issue's goal) is measured first, before a timeout can cut it."""
    return tuple(sorted(setup.sizes, reverse=True))


def ensemble_section(setup: Setup, device: torch.device, dtype: torch.dtype, rows: list, save) -> None:
    """Appends a row per S to `rows` as it is measured (and saves), so that a timeout keeps the rows done."""

    def on_row(r: dict) -> None:
        rows.append({**r, "stacked_vs_one": r["stacked"] / r["one"], "loop_vs_one": r["loop"] / r["one"]})
        save()
        print(
            f"  S={r['S']}: stacked / one {r['stacked'] / r['one']:.2f}, loop / one {r['loop'] / r['one']:.2f}",
            flush=True,
        )

    mp = model_params(setup)
    tok = load_tokenizer(mp.tokenizer)
    models = [
        build_model(mp, tok.vocab_size, tok.eos_id, seed=i).to(device=device, dtype=dtype).eval()
        for i in range(max(setup.sizes))
    ]
    scratch_rows(
        models,
        tok.eos_id,
        device,
        (setup.gen_batch,),
        largest_first(setup),
        setup.gen_new,
        setup.gen_repeats,
        on_row,
    )


def lora_ensemble_section(
    setup: Setup, device: torch.device, dtype: torch.dtype, base: Path, rows: list, save
) -> None:
    """Appends a row per S to `rows` as it is measured (and saves)."""
    from sisaflow.models.pretrained import load_base_model

    def on_row(r: dict) -> None:
        r["batched_vs_one"], r["loop_vs_one"] = r["batched"] / r["one"], r["loop"] / r["one"]
        r["stacked_vs_one"] = None if r["stacked"] is None else r["stacked"] / r["one"]
        rows.append(r)
        save()
        stacked = "n/a" if r["stacked_vs_one"] is None else f"{r['stacked_vs_one']:.2f}"
        print(
            f"  S={r['S']}: BatchedLora / one {r['batched_vs_one']:.2f}, stacked / one {stacked}", flush=True
        )

    model = load_base_model(str(base))
    lora_rows(
        model,
        str(base),
        device,
        dtype,
        (setup.gen_batch,),
        largest_first(setup),
        setup.gen_new,
        setup.gen_repeats,
        on_row,
    )


def library_label(run: dict) -> str:
    if run["deterministic"]:
        return f"library, {run['run']}"
    return "library, train.deterministic false" + (", second" if run["run"].endswith("second") else "")


def markdown(out: dict) -> str:
    """The figures as the tables of bench/RESULTS.md."""
    lines = [f"## GPU figures (`bench/gpu.py`), {out['device']}", ""]
    lines.append(
        f"torch {out['torch']}, transformers {out['transformers']}, peft {out.get('peft')}; "
        f"{out['seconds']:.0f} s in all."
    )
    train = out.get("train")
    if isinstance(train, dict) and "parameters" in train:
        lines += [
            "",
            f"Training, {train['parameters'] / 1e6:.1f} M parameters, batch {train['batch'][0]} x {train['batch'][1]}:",
            "",
            "| mode | loop | tokens/s | TFLOP/s (6N) | MFU (6N) | MFU (with attention) | warm-up / call s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for mode in ("eager", "compiled"):
            if mode not in train:
                continue
            rows = [("bare", train[mode]["bare"])] + [(library_label(r), r) for r in train[mode]["library"]]
            for name, r in rows:
                mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
                mfu_a = "n/a" if r["mfu_with_attention"] is None else f"{r['mfu_with_attention']:.1%}"
                extra = r.get("warmup_seconds", r.get("call_seconds"))
                lines.append(
                    f"| {mode} | {name} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {mfu_a} | {extra} |"
                )
            t = train[mode]
            lines.append(f"| {mode} | library / bare | {t['library_vs_bare']:.2f}x | | | | |")
            if "library_fast_vs_bare" in t:
                lines.append(
                    f"| {mode} | library, deterministic false / bare | {t['library_fast_vs_bare']:.2f}x | | | | |"
                )
            lines.append(
                f"| {mode} | two library runs bitwise equal | {'yes' if t['repeatable'] else 'no'} | | | | |"
            )
    profile = out.get("train_profile")
    if isinstance(profile, dict) and profile.get("variants"):
        import train_profile

        lines += ["", train_profile.markdown(profile).rstrip("\n")]
    rows = out.get("ensemble")
    if isinstance(rows, list) and rows:
        lines += [
            "",
            f"Ensemble generation, from-scratch constituents (tokens/s over all rows; batch {rows[0]['batch']}):",
            "",
            "| S | one model | loop | stacked | loop / one | stacked / one | stacked / loop | same tokens |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in sorted(rows, key=lambda r: r["S"]):
            lines.append(
                f"| {r['S']} | {r['one']:,.0f} | {r['loop']:,.0f} | {r['stacked']:,.0f} | {r['loop_vs_one']:.2f} "
                f"| {r['stacked_vs_one']:.2f} | {r['stacked'] / r['loop']:.2f} | {'yes' if r['same_tokens'] else 'NO'} |"
            )
    rows = out.get("lora_ensemble")
    if isinstance(rows, list) and rows:
        lines += [
            "",
            f"Ensemble generation, LoRA constituents (tokens/s over all rows; batch {rows[0]['batch']}; one model = "
            "the base alone; stacked = what the Ensemble serves for a Llama base):",
            "",
            "| S | base alone | peft loop | BatchedLora | stacked | BatchedLora / one | stacked / one | same tokens |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in sorted(rows, key=lambda r: r["S"]):
            st = "n/a" if r["stacked"] is None else f"{r['stacked']:,.0f}"
            st_one = "n/a" if r["stacked_vs_one"] is None else f"{r['stacked_vs_one']:.2f}"
            same = r["same_tokens"] and r.get("stacked_same_tokens", True)
            lines.append(
                f"| {r['S']} | {r['one']:,.0f} | {r['loop']:,.0f} | {r['batched']:,.0f} | {st} "
                f"| {r['batched_vs_one']:.2f} | {st_one} | {'yes' if same else 'NO'} |"
            )
    lt = out.get("lora_train")
    if isinstance(lt, dict):
        lines += ["", "LoRA training (eager):", "", "| loop | tokens/s | call s |", "| --- | ---: | ---: |"]
        lines.append(f"| bare peft | {lt['bare']['tokens_per_s']:,.0f} | {lt['bare']['warmup_seconds']} |")
        for r in lt["library"]:
            lines.append(f"| {library_label(r)} | {r['tokens_per_s']:,.0f} | {r['call_seconds']} |")
        lines.append(f"| library / bare | {lt['library_vs_bare']:.2f}x | |")
        lines.append(f"| two library runs bitwise equal | {'yes' if lt['repeatable'] else 'no'} | |")
    skipped = [k for k, v in out.items() if isinstance(v, str) and v.startswith("skipped")]
    if skipped:
        lines += ["", "Skipped: " + ", ".join(f"{k} ({out[k]})" for k in skipped)]
    failed = [k for k in out if k.endswith("_error")]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{k[: -len('_error')]} ({out[k]})" for k in failed)]
    return "\n".join(lines) + "\n"


SECTIONS = ("train", "ensemble", "lora-ensemble", "lora-train", "train-profile")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu.json and gpu.md")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing"
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="with --smoke: record a failing section and go on, as a GPU run always does",
    )
    ap.add_argument(
        "--train-modes",
        default="eager,compiled",
        help="train section: eager, compiled or both (default; --smoke trains eager only)",
    )
    ap.add_argument(
        "--compiled-fast",
        action="store_true",
        help="train section: also train.deterministic false under torch.compile (two runs, about 75 s more)",
    )
    import train_profile  # here: it imports this module

    train_profile.add_arguments(ap)
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here; bench/gpu.py measures a GPU (use --smoke to check the script on CPU)")
    setup = SMOKE if args.smoke else FULL
    train_modes = [m.strip() for m in args.train_modes.split(",") if m.strip()]
    if not train_modes or set(train_modes) - {"eager", "compiled"}:
        ap.error(f"--train-modes: choose eager, compiled or both, not {args.train_modes!r}")
    if args.smoke:
        train_modes = ["eager"]  # compiling on a CPU would take minutes and measures nothing the library does
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    out_dir = Path(args.out)
    import peft

    name = device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    record = RunRecord(
        out_dir / "gpu.json",
        device,
        peak_bf16_flops=peak,
        peft=peft.__version__,
        cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        setup=setup.__dict__,
        smoke=args.smoke,
    )
    out, save = record.out, record.save

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        base = random_base(setup, tmp / "base") if {"lora-ensemble", "lora-train"} & set(only) else None
        for section, key in record.sections(
            only, args.budget_s
        ):  # in the order asked: what matters most first
            with record.kept(key, strict=args.smoke and not args.keep_going):
                if section == "train":
                    out[key] = {}
                    train_section(
                        setup, device, tmp, peak, save, out[key], args.compiled_fast, tuple(train_modes)
                    )
                elif section == "ensemble":
                    out[key] = []
                    ensemble_section(setup, device, dtype, out[key], save)
                elif section == "lora-ensemble":
                    assert base is not None
                    out[key] = []
                    lora_ensemble_section(setup, device, dtype, base, out[key], save)
                elif section == "train-profile":
                    out[key] = {}

                    def save_profile(section: dict = out[key]) -> None:
                        save()
                        (out_dir / train_profile.TRAIN_PROFILE_MD).write_text(train_profile.markdown(section))

                    train_profile.profile_section(
                        setup, device, tmp, save_profile, out[key], **train_profile.section_kwargs(args)
                    )
                else:
                    assert base is not None
                    out[key] = lora_train_section(setup, device, tmp, base, peak, save)
    save()
    text = markdown(out)
    (out_dir / "gpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
