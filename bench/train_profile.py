"""Where compiled training's time goes, and which setting keeps two trainings bitwise equal (issue 18, point 3).

    PYTHONPATH=src:. python bench/gpu.py --only train-profile --out DIR [--profile-budget-s 240]
        [--profile-steps 5] [--profile-sweep strict-padded,nondeterministic,strict-unpadded,strict-inductor-free]
    PYTHONPATH=src:. python bench/train_profile.py --out DIR [--smoke] [same flags]   # this section alone

bench/gpu.py's model and batch (FULL: the SmolLM2-135M shape with GPT-2's 50,257 tokens, 32 x 1024 tokens, bf16
autocast, fused AdamW, clipping), compiled on CUDA. Three variants, each profiled over --profile-steps steps
after warm-up with torch.profiler (CUDA activity on a GPU, CPU otherwise), in one process:
- bare: the bare loop (bench/gpu.py's `bare_step`) under the library's process settings with
  train.deterministic false (`training._process_settings`: threads; no deterministic algorithms);
- bare, library settings: the same loop under train.deterministic true (strict deterministic algorithms,
  cuBLAS's fixed workspace, inductor in its deterministic mode, and force_shape_pad when compiled);
- library: `train_shard` itself on a one-slice workspace of as many batches (the profiler steps on the
  progress meter's advances, so what is profiled is exactly the steps train_shard runs).
The bare loop passes labels as a tensor of their own (equal to the inputs, as the library's are), so that the
bare loop under the library's settings and the library share one compiled graph: what differs between those
two is the loop, not the compilation. For each variant: kernel time per step (the sum of the kernels' own
device time), the kernels' timeline per step and how busy the device was in it, the top 15 kernels by own time
(count, total ms, % of the step's kernel time), and groups (matmul, attention, elementwise / fused, optimizer
with clipping, copies / memset / padding, other); the bare variants also have a clean timed rate (no profiler).

Then a sweep of settings over the library's own `train_shard` (two trainings each: tokens/s of the second, and
whether the two checkpoints' weights are bitwise equal), the settings that reuse a graph compiled above first
(dynamo guards on the deterministic flags and the thread count, not on inductor's config, so a setting that
changes only inductor's config resets dynamo and compiles anew):
- strict-padded: train.deterministic true as the library runs it (strict algorithms, force_shape_pad); its
  first training is the library variant's (reuses the graph of "bare loop, library settings");
- nondeterministic: train.deterministic false (reuses the graph of "bare loop, deterministic false");
- strict-unpadded: strict algorithms without force_shape_pad (inductor's deterministic mode then never pads);
- strict-inductor-free: strict algorithms for torch's own kernels, inductor out of its deterministic mode (it
  benchmarks pad-mm and reduction configs; its choices are cached in the process and on disk, so two trainings
  in one process repeat, but a fresh process on a cold cache may choose otherwise: no guarantee).
The default sweep is strict-padded and strict-unpadded (--profile-sweep picks others). Expected at FULL on an
H200 (compilation about 60 s a setting, a step 0.13-0.19 s, a library training call about 10 s): the two bare
variants about 75 s each (each compiles), the library variant 15 s, strict-padded's second training 12 s,
strict-unpadded 85 s: about 4.5 minutes, three compilations; nondeterministic adds about 25 s and
strict-inductor-free about 85 s. A setting that would start after --profile-budget-s seconds of this section
is skipped and says so. Every variant and setting is saved as soon as it is measured (gpu.json, or
train_profile.json alone; train_profile.md beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as bench/gpu.py: before the first GPU matmul

import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import gpu  # noqa: E402  (puts src/ on the path)

import sisaflow.training.loop as training  # noqa: E402
from sisaflow.core import progress  # noqa: E402
from sisaflow.core.config import TrainParams  # noqa: E402
from sisaflow.models.scratch import build_model  # noqa: E402
from sisaflow.models.tokenizer import load_tokenizer  # noqa: E402
from sisaflow.training.loop import derive_seed, train_shard  # noqa: E402

TRAIN_PROFILE_MD = "train_profile.md"
TOP = 15
GROUPS = ("matmul", "attention", "elementwise / fused", "optimizer", "copies / memset / padding", "other")


@dataclass(frozen=True)
class Setting:
    """One row of the sweep: train.deterministic, and inductor config set inside the library's own settings."""

    name: str
    deterministic: bool
    inductor: dict = field(default_factory=dict)
    note: str = ""


SETTINGS = (
    Setting("strict-padded", True, {}, "train.deterministic true, as the library runs it"),
    Setting("nondeterministic", False, {}, "train.deterministic false"),
    Setting("strict-unpadded", True, {"force_shape_pad": False}, "strict, without force_shape_pad"),
    Setting(
        "strict-inductor-free",
        True,
        {
            "deterministic": False,
            "force_shape_pad": False,
            "write_are_deterministic_algorithms_enabled": False,
        },
        "strict algorithms; inductor benchmarks its choices (repeats within a process, not guaranteed across)",
    ),
)
DEFAULT_SWEEP = ("strict-padded", "strict-unpadded")
"""What answers the question in about 4 minutes at FULL (the other two: --profile-sweep)."""
VARIANTS = {
    "bare": "bare loop, deterministic false",
    "bare_deterministic": "bare loop, library settings",
    "library": "library (train_shard)",
}


# ----------------------------------------------------------------------------------------------- kernels


def group_of(name: str) -> str:
    """The group of a kernel (CUDA) or an operator (CPU), by its name."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa", "_efficient_")):
        return "attention"
    if any(k in n for k in ("adam", "multi_tensor", "foreach", "optimizer", "lpnorm", "clip_grad")):
        return "optimizer"
    if n.startswith("triton_tem") or any(
        k in n
        for k in (
            "gemm",
            "gemv",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "matmul",
            "splitk",
            "aten::mm",
            "aten::bmm",
        )
    ):
        return "matmul"
    if n.startswith("aten::addmm") or n.startswith("aten::linear"):
        return "matmul"
    if re.match(
        r"aten::(empty|as_strided|t$|transpose|view|reshape|_reshape|expand|permute|detach|slice|select|"
        r"unsqueeze|squeeze|alias|unbind|split|chunk|_unsafe_view|contiguous|resolve)",
        n,
    ):
        return "other"  # CPU only: allocation and views, no kernel of their own on a GPU
    if n.startswith("triton_"):  # inductor's fused kernels, named after the ops fused ("_to_copy" is a cast)
        return "copies / memset / padding" if "constant_pad" in n else "elementwise / fused"
    if re.search(r"memcpy|memset|copy|fill|catarray|(^|[_:])cat($|_)|zero_|constant_pad", n):
        return "copies / memset / padding"
    if any(
        k in n
        for k in (
            "elementwise",
            "vectorized",
            "reduce",
            "softmax",
            "norm",
            "index",
            "scatter",
            "gather",
            "embedding",
            "aten::",
        )
    ):
        return "elementwise / fused"
    return "other"


def _is_kernel(event, cuda: bool) -> bool:
    """A CUDA kernel, copy or memset (device events); on CPU an operator (not the profiler's step ranges)."""
    from torch.autograd import DeviceType

    if cuda:
        return event.device_type == DeviceType.CUDA
    return event.device_type == DeviceType.CPU and not event.key.startswith("ProfilerStep")


def _own_us(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0))
    return float(event.self_cpu_time_total)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(prof, steps: int, cuda: bool) -> dict:
    """Kernel time per step, the kernels' timeline, the top kernels and the groups of one profiled run."""
    kernels = []
    for e in prof.key_averages():
        if _is_kernel(e, cuda) and _own_us(e, cuda) > 0:
            kernels.append((e.key, int(e.count), _own_us(e, cuda) / 1e3))
    total_ms = sum(ms for _, _, ms in kernels)
    kernels.sort(key=lambda k: -k[2])
    groups = {g: 0.0 for g in GROUPS}
    for name, _, ms in kernels:
        groups[group_of(name)] += ms
    spans = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if _is_kernel(e, cuda) and e.time_range.end > e.time_range.start
    ]
    span_ms = (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e3 if spans else 0.0
    busy_ms = _union_us(spans) / 1e3
    return {
        "profiled_steps": steps,
        "kernel_ms_per_step": total_ms / steps,
        "timeline_ms_per_step": span_ms / steps,
        "busy_fraction": busy_ms / span_ms if span_ms else None,
        "kernel_names": len(kernels),
        "top_kernels": [
            {
                "name": name[:300],
                "group": group_of(name),
                "count": count,
                "total_ms": ms,
                "pct_of_step": ms / total_ms if total_ms else 0.0,
            }
            for name, count, ms in kernels[:TOP]
        ],
        "groups": {
            g: {"ms_per_step": ms / steps, "pct_of_step": ms / total_ms if total_ms else 0.0}
            for g, ms in groups.items()
        },
        "by_name_ms_per_step": {name[:300]: ms / steps for name, _, ms in kernels[:200]},
        **({} if kernels else {"warning": "the profiler saw no kernel (on a GPU: is CUPTI available?)"}),
    }


def _profiler(cuda: bool, skip_first: int, steps: int):
    from torch.profiler import ProfilerActivity, profile, schedule

    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    return profile(
        activities=[activity],
        schedule=schedule(skip_first=skip_first, wait=0, warmup=1, active=steps, repeat=1),
    )


# ----------------------------------------------------------------------------------------------- variants


@dataclass
class Inputs:
    setup: gpu.Setup
    device: torch.device
    batch: torch.Tensor
    records: list
    tmp: Path
    steps: int
    say: Callable[[str], None]


def prepare(setup: gpu.Setup, device: torch.device, tmp: Path, steps: int) -> Inputs:
    """The records every library training here trains on (setup.steps batches, or more if the profiled run
    needs them); the bare loop's batch is the first setup.batch of them (every record fills the context, so the
    library's batches have its shape)."""
    mp = gpu.model_params(setup)
    tok = load_tokenizer(mp.tokenizer)
    count = setup.batch * max(setup.steps, setup.warmup + 1 + steps)
    records = gpu.long_records(setup, tok, count, "profile")
    first = [(tok.encode(r.text) + [tok.eos_id])[: setup.context] for r in records[: setup.batch]]
    return Inputs(setup, device, torch.tensor(first, device=device), records, tmp, steps, lambda m: None)


def _fresh_model(inputs: Inputs) -> torch.nn.Module:
    mp = gpu.model_params(inputs.setup)
    tok = load_tokenizer(mp.tokenizer)
    return build_model(mp, tok.vocab_size, tok.eos_id, derive_seed(0, "init", 0)).to(inputs.device)


def _compiles(device: torch.device) -> bool:
    return device.type == "cuda"  # as the library: CPU stays eager


def bare_variant(inputs: Inputs, deterministic: bool) -> dict:
    """The bare loop under the library's process settings for train.deterministic `deterministic`: warm-up
    (compilation), a clean timed run of setup.steps steps, then the profiled steps."""
    setup, device = inputs.setup, inputs.device
    cuda = device.type == "cuda"
    said: list[str] = []
    tp = TrainParams(deterministic=deterministic, compile=True, device=device.type)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    with training._process_settings(tp, device, said.append):
        model = _fresh_model(inputs)
        labels = inputs.batch.clone()  # a tensor of its own, as the library's: one graph for both
        step = gpu.bare_step(model, inputs.batch, device, _compiles(device), labels=labels)
        for _ in range(setup.warmup):
            step()
        gpu.sync(device)
        warm = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(setup.steps):
            step()
        gpu.sync(device)
        timed = time.perf_counter() - t1
        with _profiler(cuda, 0, inputs.steps) as prof:
            for i in range(1 + inputs.steps):
                step()
                if i == inputs.steps:
                    gpu.sync(device)  # the last profiled step's kernels end inside the profiled window
                prof.step()
        out = summarize(prof, inputs.steps, cuda)
        del model, step
    tokens = setup.steps * inputs.batch.numel()
    out.update(
        settings=_settings_label(deterministic, device),
        warmup_seconds=round(warm, 2),
        timed_tokens_per_s=tokens / timed,
        seconds=round(time.perf_counter() - t0, 1),
        said=said,
    )
    return out


@contextlib.contextmanager
def _advances_step(prof, last: int, device: torch.device) -> Iterator[list[float]]:
    """Every advance of a progress meter (train_shard's steps) steps the profiler; yields their host times. The
    device is synchronised at the `last` profiled step only (train_shard itself never waits for it)."""
    times: list[float] = []

    def on_advance(_: object) -> None:
        if len(times) + 1 == last:
            gpu.sync(device)
        times.append(time.perf_counter())
        prof.step()

    progress._watchers.append(on_advance)  # watch() collects; this needs a call per advance
    try:
        yield times
    finally:
        progress._watchers.remove(on_advance)


def library_variant(inputs: Inputs) -> dict:
    """train_shard on a one-slice workspace of the sweep's records, profiled on the steps after setup.warmup + 1
    (the first pay any compilation the variants before have not); the rest of the steps run unprofiled. Its
    checkpoint's weights are the strict-padded setting's first training (the profiler changes no kernel)."""
    setup, device = inputs.setup, inputs.device
    cuda = device.type == "cuda"
    n = setup.warmup + 1 + inputs.steps
    ws = gpu.workspace(inputs.tmp / "profile-library", inputs.records)
    params = gpu.params_for(setup, device.type, _compiles(device))
    t0 = time.perf_counter()
    with _profiler(cuda, setup.warmup, inputs.steps) as prof, _advances_step(prof, n, device) as times:
        rep = train_shard(ws, 0, params, progress=inputs.say)
    call = time.perf_counter() - t0
    (sl,) = rep.slices
    assert sl.steps >= n, (sl.steps, n)
    out = summarize(prof, inputs.steps, cuda)
    out["timed_tokens_per_s"] = None  # filled from the sweep's strict-padded row (train_shard's own timing)
    active = times[setup.warmup : n]  # host clock at the end of the warm-up step, then of each profiled step
    out.update(
        settings=_settings_label(params.train.deterministic, device),
        host_ms_per_step=(active[-1] - active[0]) * 1e3 / inputs.steps,
        seconds=round(call, 1),
        run={
            "run": "first, profiled",
            "tokens": sl.tokens,
            "steps": sl.steps,
            "seconds": round(sl.seconds, 3),
            "tokens_per_s": sl.tokens / sl.seconds,
            "call_seconds": round(call, 2),
            "final_loss": sl.loss,
            "deterministic": params.train.deterministic,
            "weights": gpu.weights_hash(ws.checkpoint_dir(0, 0)),
        },
    )
    shutil.rmtree(ws.root)
    return out


def _settings_label(deterministic: bool, device: torch.device) -> str:
    """What train.deterministic means on this device (training._process_settings)."""
    if not deterministic:
        return "train.deterministic false"
    if device.type == "cuda":
        return "train.deterministic true: strict algorithms, inductor deterministic, force_shape_pad"
    return "train.deterministic true (CPU: warn-only, eager)"


# ----------------------------------------------------------------------------------------------- sweep


@contextlib.contextmanager
def library_with(inductor: dict) -> Iterator[dict]:
    """train_shard with `inductor` config set inside the library's own process settings (which set inductor's
    deterministic mode and force_shape_pad first); yields the keys this torch lacks (they are left out)."""
    import torch._inductor.config as inductor_config

    known = {k: v for k, v in inductor.items() if hasattr(inductor_config, k)}
    missing = {k: v for k, v in inductor.items() if k not in known}
    original = training._process_settings

    @contextlib.contextmanager
    def settings(tp, device, say):
        with original(tp, device, say), inductor_config.patch(**known):
            yield

    training._process_settings = settings  # train_shard looks it up at each call
    try:
        yield missing
    finally:
        training._process_settings = original


def sweep_row(inputs: Inputs, setting: Setting, reset: bool, first: dict | None = None) -> dict:
    """Two trainings under `setting`; `first`, when given, is the first already trained (the library variant's,
    for strict-padded), and one more is run."""
    setup, device = inputs.setup, inputs.device
    t0 = time.perf_counter()
    if reset:
        torch._dynamo.reset()  # dynamo would reuse a graph compiled under another inductor config
    params = gpu.params_for(setup, device.type, _compiles(device), deterministic=setting.deterministic)
    with library_with(setting.inductor) as missing:
        runs = gpu.library_runs(
            setup,
            params,
            inputs.records,
            inputs.tmp,
            f"sweep-{setting.name}",
            ("second",) if first else ("first", "second"),
        )
    runs = ([first] if first else []) + runs
    return {
        "setting": setting.name,
        "note": setting.note,
        "deterministic": setting.deterministic,
        "inductor": setting.inductor,
        "inductor_missing": sorted(missing),
        "dynamo_reset": reset,
        "runs": runs,
        "tokens_per_s": runs[-1]["tokens_per_s"],
        "repeatable": runs[0]["weights"] == runs[1]["weights"],
        "seconds": round(time.perf_counter() - t0 + (first["call_seconds"] if first else 0.0), 1),
    }


def profile_section(
    setup: gpu.Setup,
    device: torch.device,
    tmp: Path,
    save: Callable[[], None],
    section: dict,
    steps: int = 5,
    budget_s: float = 240.0,
    sweep: tuple[str, ...] = DEFAULT_SWEEP,
    keep_going: bool = False,
) -> None:
    """Fills `section` (variants, then the sweep), calling save() after each measurement. With `keep_going` (a
    device run: one call is all there is) a failing variant or setting is recorded and the rest still run."""
    start = time.perf_counter()
    unknown = sorted(set(sweep) - {s.name for s in SETTINGS})
    if unknown:
        raise ValueError(
            f"unknown sweep setting(s) {unknown}; choose from {', '.join(s.name for s in SETTINGS)}"
        )
    inputs = prepare(setup, device, tmp, steps)
    section.update(
        batch=[setup.batch, setup.context],
        tokens_per_step=int(inputs.batch.numel()),
        compiled=_compiles(device),
        budget_s=budget_s,
        variants={},
        sweep=[],
    )
    save()
    for key, run in (
        ("bare", lambda: bare_variant(inputs, deterministic=False)),
        ("bare_deterministic", lambda: bare_variant(inputs, deterministic=True)),
        ("library", lambda: library_variant(inputs)),
    ):
        print(f"  profile: {VARIANTS[key]} ...", flush=True)
        section["variants"][key] = {"label": VARIANTS[key], **_guarded(run, keep_going)}
        _free(device)
        save()
    bare_rate = section["variants"]["bare"].get("timed_tokens_per_s")  # None if that variant failed
    # the settings that reuse a graph compiled above first; a reset discards those graphs, so it comes after
    reuse = [s for s in SETTINGS if s.name in sweep and not s.inductor]
    anew = [s for s in SETTINGS if s.name in sweep and s.inductor]
    for setting in reuse + anew:
        spent = time.perf_counter() - start
        if spent > budget_s:
            section["sweep"].append(
                {
                    "setting": setting.name,
                    "skipped": f"{spent:.0f} s spent in this section, budget {budget_s:.0f} s",
                }
            )
            save()
            continue
        print(f"  sweep: {setting.name} ...", flush=True)
        library = section["variants"]["library"]
        first = library.get("run") if setting.name == "strict-padded" else None
        row = _guarded(lambda s=setting, f=first: sweep_row(inputs, s, bool(s.inductor), f), keep_going)
        row.setdefault("setting", setting.name)
        if bare_rate and "tokens_per_s" in row:
            row["vs_bare"] = row["tokens_per_s"] / bare_rate
        if setting.name == "strict-padded" and "tokens_per_s" in row and "error" not in library:
            # the library's own timing of its steps (train_shard, no profiler), for the variants' table
            library["timed_tokens_per_s"] = row["tokens_per_s"]
        section["sweep"].append(row)
        _free(device)
        save()
    section["seconds"] = round(time.perf_counter() - start, 1)
    save()


def _guarded(run: Callable[[], dict], keep_going: bool) -> dict:
    try:
        return run()
    except Exception as exc:
        if not keep_going:
            raise
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- markdown


def _short(name: str, width: int = 90) -> str:
    name = name.replace("|", "\\|")
    return name if len(name) <= width else name[: width - 3] + "..."


def markdown(section: dict) -> str:
    """The section as markdown: the variants side by side, the largest differences by kernel, each variant's
    top kernels, and the sweep."""
    variants = section.get("variants") or {}
    keys = [k for k in VARIANTS if k in variants and "error" not in variants[k]]
    failed = [f"{VARIANTS[k]} ({variants[k]['error']})" for k in VARIANTS if "error" in variants.get(k, {})]
    failed += [f"{r['setting']} ({r['error']})" for r in section.get("sweep") or [] if "error" in r]
    if not keys:
        return "Profile: nothing measured" + (f"; failed: {'; '.join(failed)}" if failed else "") + "\n"
    lines = [
        f"Where compiled training's time goes (`bench/train_profile.py`; batch {section['batch'][0]} x "
        f"{section['batch'][1]}, {'compiled' if section.get('compiled') else 'eager'}; "
        f"{variants[keys[0]]['profiled_steps']} profiled steps each):",
        "",
        "| | " + " | ".join(VARIANTS[k] for k in keys) + " |",
        "| --- |" + " ---: |" * len(keys),
        "| settings | " + " | ".join(variants[k]["settings"] for k in keys) + " |",
    ]

    def row(label: str, value: Callable[[dict], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(value(variants[k]) for k in keys) + " |")

    # the library's: its strict-padded training after the profiled one (train_shard's own timing of its steps)
    row("tokens/s, timed without the profiler", lambda v: _num(v.get("timed_tokens_per_s")))
    bare_rate = variants["bare"].get("timed_tokens_per_s") if "bare" in keys else None
    row(
        "/ bare",
        lambda v: (
            "n/a"
            if not (bare_rate and v.get("timed_tokens_per_s"))
            else f"{v['timed_tokens_per_s'] / bare_rate:.2f}x"
        ),
    )
    row("kernel ms / step", lambda v: f"{v['kernel_ms_per_step']:.2f}")
    row(
        "host ms / step (library: between its steps, unsynchronised)",
        lambda v: f"{v['host_ms_per_step']:.2f}" if "host_ms_per_step" in v else "n/a",
    )
    row("kernel timeline ms / step", lambda v: f"{v['timeline_ms_per_step']:.2f}")
    row(
        "device busy in the timeline",
        lambda v: "n/a" if v["busy_fraction"] is None else f"{v['busy_fraction']:.0%}",
    )
    for g in GROUPS:
        row(
            f"{g} ms / step (% of kernel time)",
            lambda v, g=g: f"{v['groups'][g]['ms_per_step']:.2f} ({v['groups'][g]['pct_of_step']:.0%})",
        )
    if "bare" in keys and len(keys) > 1:
        lines += _differences(variants, keys)
    for k in keys:
        lines += [
            "",
            f"Top {TOP} kernels, {VARIANTS[k]}:",
            "",
            "| kernel | group | count | total ms | % of step |",
        ]
        lines.append("| --- | --- | ---: | ---: | ---: |")
        for r in variants[k]["top_kernels"]:
            lines.append(
                f"| `{_short(r['name'])}` | {r['group']} | {r['count']} | {r['total_ms']:.2f} "
                f"| {r['pct_of_step']:.1%} |"
            )
    sweep = section.get("sweep") or []
    if sweep:
        lines += [
            "",
            "Settings, the library's train_shard (two trainings each; tokens/s of the second):",
            "",
            "| setting | what | tokens/s | / bare | two trainings bitwise equal | s (both) |",
            "| --- | --- | ---: | ---: | --- | ---: |",
        ]
        for r in sweep:
            if "skipped" in r or "error" in r:
                why = f"skipped: {r['skipped']}" if "skipped" in r else "failed"
                lines.append(f"| {r['setting']} | {why} | | | | |")
                continue
            vs = f"{r['vs_bare']:.2f}x" if "vs_bare" in r else "n/a"
            missing = (
                f" (this torch lacks {', '.join(r['inductor_missing'])})" if r["inductor_missing"] else ""
            )
            lines.append(
                f"| {r['setting']} | {r['note']}{missing} | {r['tokens_per_s']:,.0f} | {vs} "
                f"| {'yes' if r['repeatable'] else 'no'} | {r['seconds']} |"
            )
    if failed:
        lines += ["", "Failed: " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _differences(variants: dict, keys: list[str], count: int = 10) -> list[str]:
    """The kernels whose time per step differs most from the bare loop's (by name; inductor's generated names
    can differ between compilations of the same graph, so the groups above are the sturdier comparison)."""
    names: set[str] = set()
    for k in keys:
        names |= set(variants[k]["by_name_ms_per_step"])
    last = keys[-1]

    def ms(k: str, n: str) -> float:
        return variants[k]["by_name_ms_per_step"].get(n, 0.0)

    ranked = sorted(names, key=lambda n: -abs(ms(last, n) - ms("bare", n)))[:count]
    lines = [
        "",
        f"Largest differences from the bare loop, ms / step ({VARIANTS[last]} minus bare):",
        "",
        "| kernel | " + " | ".join(VARIANTS[k] for k in keys) + " | difference |",
        "| --- |" + " ---: |" * (len(keys) + 1),
    ]
    for n in ranked:
        cells = " | ".join(f"{ms(k, n):.2f}" for k in keys)
        lines.append(f"| `{_short(n, 70)}` | {cells} | {ms(last, n) - ms('bare', n):+.2f} |")
    return lines


# ----------------------------------------------------------------------------------------------- alone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for train_profile.json and train_profile.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script")
    add_arguments(ap)
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here (use --smoke to check the script on CPU)")
    setup = gpu.SMOKE if args.smoke else gpu.FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {"device": gpu.device_name(device), "torch": torch.__version__, "smoke": args.smoke}

    def save() -> None:
        (out_dir / "train_profile.json").write_text(json.dumps(out, indent=2, default=str))
        (out_dir / TRAIN_PROFILE_MD).write_text(markdown(out["train_profile"]))

    out["train_profile"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        profile_section(setup, device, Path(tmp), save, out["train_profile"], **section_kwargs(args))
    print(markdown(out["train_profile"]))
    return 0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The section's flags (bench/gpu.py adds them too)."""
    ap.add_argument("--profile-steps", type=int, default=5, help="train-profile: profiled steps per variant")
    ap.add_argument(
        "--profile-budget-s",
        type=float,
        default=240.0,
        help="train-profile: start no sweep setting after this many seconds of the section",
    )
    ap.add_argument(
        "--profile-sweep",
        type=_sweep_names,
        default=",".join(DEFAULT_SWEEP),
        help="train-profile: comma-separated settings to sweep, of "
        + ", ".join(s.name for s in SETTINGS)
        + f" (default {','.join(DEFAULT_SWEEP)})",
    )


def _sweep_names(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(set(names) - {s.name for s in SETTINGS})
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown setting(s) {unknown}; choose from {', '.join(s.name for s in SETTINGS)}"
        )
    return names


def section_kwargs(args: argparse.Namespace) -> dict:
    """profile_section's keywords from the parsed flags; off --smoke (on a device) a failure is recorded and the
    rest runs, as bench/gpu.py's --keep-going."""
    sweep = args.profile_sweep
    keep_going = not args.smoke or getattr(args, "keep_going", False)
    return {
        "steps": args.profile_steps,
        "budget_s": args.profile_budget_s,
        "sweep": sweep,
        "keep_going": keep_going,
    }


if __name__ == "__main__":
    raise SystemExit(main())
