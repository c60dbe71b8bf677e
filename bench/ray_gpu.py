"""Issue 18 point 4: S shards trained as Ray tasks sharing one GPU, against the same shards one after another in
one process; two Ray runs and the in-process run compared bit for bit.

    PYTHONPATH=src:. python bench/ray_gpu.py --out DIR [--budget-s 210] [--records N]
    PYTHONPATH=src:. python bench/ray_gpu.py --smoke --out DIR   # CPU, tiny shapes: checks this script (a unit test)
    (on the GPU machine, which lacks Ray: bash bench/ray_gpu.sh, whose head says how)

One corpus of real text (the shipped TOFU answers, joined into records of at least a context's worth of tokens,
one owner each) is written to Parquet and sharded by the library (S shards, R slices) into three fresh
workspaces, one per run:
- in-process: `train_shard` for every shard in turn, in this process (what `sisaflow` does without Ray);
- Ray, twice: the library's launcher (`ray_launcher.train_shards`) on a local Ray that this script starts once
  (`ray.init`: num_gpus 1, a capped object store, its temporary directory under a fresh /tmp folder, usage stats
  off), every shard one task with `ray.num_gpus_per_shard` 1/S, so all S share the one GPU at once. The first
  run starts the workers (each imports torch and makes its CUDA context); the second finds them started.
For each run: wall seconds, tokens trained and tokens/s (over the wall time), the per-shard training seconds,
and every shard's final weights hash (`checkpoint.weights_hash`); then whether the two Ray runs are bitwise equal,
and equal to the in-process run. train.deterministic is on (the default), so on one GPU they should be.

Writes DIR/ray_gpu.json after every run (a timeout keeps what was measured) and DIR/ray_gpu.md at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUBLAS = ":4096:8"  # one of loop.CUBLAS_DETERMINISTIC; cuBLAS reads it at a process's first GPU matmul
# before torch or Ray is imported: this process's own training, and Ray's processes (which inherit this
# environment) see them; workers need absolute paths, so PYTHONPATH's entries are made absolute
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
_paths = [str(REPO / "src"), str(REPO)] + [
    str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
]
os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(_paths))
sys.path[:0] = [str(REPO / "src"), str(REPO)]

import torch  # noqa: E402

from sisaflow.core.config import Params, ShardingParams  # noqa: E402
from sisaflow.core.paths import Workspace  # noqa: E402
from sisaflow.data.corpus import Record, content_hash, to_table, write_table  # noqa: E402
from sisaflow.data.sharding import shard_corpus  # noqa: E402
from sisaflow.models.tokenizer import load_tokenizer  # noqa: E402
from sisaflow.training.checkpoint import weights_hash  # noqa: E402
from sisaflow.training.loop import train_shard  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """Shapes and sizes of one run of the script."""

    tokenizer: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int
    batch: int
    shards: int
    slices: int
    records: int
    epochs: int
    gpus_per_shard: float
    object_store_mb: int


# byte tokens (a 257-token vocabulary keeps each checkpoint, with its optimizer state, at ~165 MB: 16 per run),
# 13.6 M parameters, batches of 16 x 1024 tokens: ~64 steps per shard, ~8.4 M tokens per run
FULL = Setup("byte", 512, 4, 8, 1536, 1024, 16, 8, 2, 4096, 2, 0.125, 512)
SMOKE = Setup("byte", 32, 2, 2, 64, 64, 4, 2, 2, 32, 1, 0.0, 200)


def params_for(setup: Setup, device: str) -> Params:
    raw = Params().to_dict()
    raw["sharding"] = {"shards": setup.shards, "slices": setup.slices}
    raw["model"].update(
        tokenizer=setup.tokenizer,
        hidden_size=setup.hidden,
        layers=setup.layers,
        heads=setup.heads,
        intermediate_size=setup.intermediate,
        context_length=setup.context,
        tie_embeddings=True,
    )
    raw["train"].update(
        device=device,
        deterministic=True,
        batch_size=setup.batch,
        epochs_per_slice=setup.epochs,
        warmup_steps=4,
        learning_rate=3e-4,
        log_every=10**6,
    )
    raw["ray"].update(
        address="",
        num_cpus_per_shard=1,
        num_gpus_per_shard=setup.gpus_per_shard,
        object_store_memory_mb=setup.object_store_mb,
        max_parallel=0,
    )
    return Params.from_dict(raw)


def corpus(setup: Setup) -> list[Record]:
    """`setup.records` records of at least a context's worth of tokens each (so every batch has one shape), cut
    from the shipped TOFU questions and answers, each its own owner; the texts repeat from different offsets."""
    lines = (REPO / "data" / "tofu" / "records.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [
        f"Question: {r['question']}\nAnswer: {r['answer']}" for r in map(json.loads, filter(None, lines))
    ]
    tok = load_tokenizer(setup.tokenizer)
    records, at = [], 0
    for n in range(setup.records):
        parts: list[str] = []
        while len(tok.encode("\n\n".join(parts))) < setup.context:
            parts.append(texts[at % len(texts)])
            at += 1
        rid = f"rec-{n:05d}"
        text = "\n\n".join(parts)
        records.append(Record(rid, f"owner-{n:05d}", text, content_hash(rid, text)))
    return records


def workspace(root: Path, records: list[Record], setup: Setup) -> Workspace:
    """A fresh workspace: the corpus as Parquet, sharded and sliced by the library."""
    ws = Workspace(root.resolve())  # Ray workers rebuild it from this path: absolute
    ws.root.mkdir(parents=True)
    write_table(ws.corpus_file, to_table(records))
    shard_corpus(ws, ShardingParams(shards=setup.shards, slices=setup.slices))
    return ws


def final_hashes(ws: Workspace, setup: Setup) -> dict[str, str]:
    return {str(s): weights_hash(ws.checkpoint_dir(s, setup.slices - 1)) for s in range(setup.shards)}


def summary(reports, wall: float, ws: Workspace, setup: Setup) -> dict:
    """One run's figures from its per-shard reports (`ShardTrainReport`s)."""
    tokens = sum(r.tokens for r in reports)
    return {
        "wall_seconds": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "shards_trained": sorted(r.shard for r in reports if r.slices),
        "slices_trained": {str(r.shard): len(r.slices) for r in reports},
        "shard_seconds": {str(r.shard): round(r.seconds, 3) for r in reports},
        "shard_seconds_sum": round(sum(r.seconds for r in reports), 3),
        "devices": sorted({r.device for r in reports}),
        "environments": sorted({json.dumps(e, sort_keys=True) for r in reports for e in r.environments}),
        "weights": final_hashes(ws, setup),
    }


def in_process_run(ws: Workspace, params: Params, setup: Setup) -> dict:
    """Every shard in turn, in this process: what training without Ray does."""
    reports = []
    t0 = time.perf_counter()
    for shard in range(setup.shards):
        reports.append(train_shard(ws, shard, params, progress=lambda m: None))
        print(
            f"  in-process shard {shard}: {reports[-1].tokens} tokens in {reports[-1].seconds:.1f} s",
            flush=True,
        )
    return summary(reports, time.perf_counter() - t0, ws, setup)


def ray_run(ws: Workspace, params: Params, setup: Setup) -> dict:
    """Every shard as one Ray task, through the library's launcher (Ray already started: it connects to it)."""
    from sisaflow.training.ray_launcher import train_shards

    t0 = time.perf_counter()
    rep = train_shards(ws, params, list(range(setup.shards)), progress=lambda m: print(f"  {m}", flush=True))
    wall = time.perf_counter() - t0
    out = summary(rep.shards, wall, ws, setup)
    out.update(launcher_wall_seconds=round(rep.wall_seconds, 3), cluster_gpus=rep.gpus)
    return out


def start_ray(setup: Setup, smoke: bool, temp_dir: Path) -> float:
    """A local Ray for this script alone; returns the seconds ray.init took."""
    os.environ["RAY_TMPDIR"] = str(temp_dir)
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray of its own, never a cluster named in the environment
    import ray

    t0 = time.perf_counter()
    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=0 if smoke else 1,
        object_store_memory=setup.object_store_mb * 1024 * 1024,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        log_to_driver=True,
        logging_level=logging.WARNING,
        # explicit, though the workers inherit this process's environment: a worker's first GPU matmul must see it
        runtime_env={"env_vars": {"CUBLAS_WORKSPACE_CONFIG": CUBLAS, "PYTHONPATH": os.environ["PYTHONPATH"]}},
    )
    return time.perf_counter() - t0


def _probe() -> dict:
    import ray

    import sisaflow

    return {
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "sisaflow": str(Path(sisaflow.__file__).resolve().parent),
        "ray": str(Path(ray.__file__).resolve().parent),
        "python": sys.executable,
        "pid": os.getpid(),
    }


def worker_probe(setup: Setup) -> dict:
    """What a worker holding a shard's resources sees: the cuBLAS setting, its GPU, where sisaflow comes from."""
    import ray

    gpus = setup.gpus_per_shard if ray.cluster_resources().get("GPU") else 0
    return ray.get(ray.remote(num_cpus=1, num_gpus=gpus)(_probe).remote())


def equal_runs(a: dict, b: dict) -> bool:
    return bool(a.get("weights")) and a.get("weights") == b.get("weights")


def compare(out: dict) -> None:
    """The comparisons, from what has been measured so far."""
    base = out.get("in_process")
    runs = {k: r for k in ("ray_1", "ray_2") if isinstance(r := out.get(k), dict) and "weights" in r}
    if len(runs) == 2:
        out["ray_runs_bitwise_equal"] = equal_runs(*runs.values())
    if isinstance(base, dict) and "weights" in base and runs:
        out["ray_equals_in_process"] = all(equal_runs(r, base) for r in runs.values())
        for key, r in runs.items():
            out[f"{key}_vs_in_process_wall"] = r["wall_seconds"] / base["wall_seconds"]
            out[f"{key}_vs_in_process_tokens_per_s"] = r["tokens_per_s"] / base["tokens_per_s"]


def yes(flag) -> str:
    return "n/a" if flag is None else ("yes" if flag else "**no**")


def markdown(out: dict) -> str:
    s = out["setup"]
    lines = [
        f"## Ray tasks sharing one GPU (`bench/ray_gpu.py`{', --smoke' if out['smoke'] else ''}), {out['device']}",
        "",
        f"torch {out['torch']}, Ray {out.get('ray')}, Python {out['python']}; S = {s['shards']} shards, "
        f"R = {s['slices']} slices, {out.get('parameters', 0) / 1e6:.1f} M parameters ({s['tokenizer']} tokens, "
        f"hidden {s['hidden']}, {s['layers']} layers), batches of {s['batch']} x {s['context']}, "
        f"ray.num_gpus_per_shard {s['gpus_per_shard']}; ray.init {out.get('ray_init_seconds', 0):.1f} s; "
        f"{out.get('seconds', 0):.0f} s in all.",
        "",
        "| run | wall s | tokens | tokens/s | shard s (sum) | wall / in-process | weights = in-process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base = out.get("in_process")
    names = {
        "in_process": "in-process, one shard after another",
        "ray_1": "Ray, first",
        "ray_2": "Ray, second",
    }
    for key, name in names.items():
        r = out.get(key)
        if not isinstance(r, dict):
            if isinstance(r, str):
                lines.append(f"| {name} | {r} | | | | | |")
            continue
        ratio = f"{r['wall_seconds'] / base['wall_seconds']:.2f}x" if isinstance(base, dict) else "n/a"
        same = (
            "(reference)"
            if key == "in_process"
            else yes(equal_runs(r, base) if isinstance(base, dict) else None)
        )
        lines.append(
            f"| {name} | {r['wall_seconds']:.1f} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} "
            f"| {r['shard_seconds_sum']:.1f} | {ratio} | {same} |"
        )
    lines += [
        "",
        f"Two Ray runs bitwise equal (every shard's final weights): {yes(out.get('ray_runs_bitwise_equal'))}.",
    ]
    failed = [k for k in out if k.endswith("_error")]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{k[: -len('_error')]} ({out[k]})" for k in failed)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for ray_gpu.json and ray_gpu.md")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing"
    )
    ap.add_argument("--budget-s", type=float, default=210.0, help="start no run after this many seconds")
    ap.add_argument("--records", type=int, default=0, help="records in the corpus (default: the setup's)")
    ap.add_argument(
        "--gpus-per-shard",
        type=float,
        default=None,
        help="ray.num_gpus_per_shard (default 1/S; ignored on CPU)",
    )
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error(
            "no CUDA device here; bench/ray_gpu.py measures a GPU (use --smoke to check the script on CPU)"
        )
    setup = SMOKE if args.smoke else FULL
    if args.records:
        setup = Setup(**{**asdict(setup), "records": args.records})
    if args.gpus_per_shard is not None and not args.smoke:
        setup = Setup(**{**asdict(setup), "gpus_per_shard": args.gpus_per_shard})
    device = "cpu" if args.smoke else "cuda"
    params = params_for(setup, device)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    out: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "setup": asdict(setup),
        "smoke": args.smoke,
        "driver_pid": os.getpid(),
    }

    def save() -> None:
        compare(out)
        out["seconds"] = time.perf_counter() - start
        (out_dir / "ray_gpu.json").write_text(json.dumps(out, indent=2, default=str))

    from sisaflow.models.scratch import build_model

    tok = load_tokenizer(setup.tokenizer)
    out["parameters"] = sum(
        p.numel() for p in build_model(params.model, tok.vocab_size, tok.eos_id, 0).parameters()
    )
    records = corpus(setup)
    out["corpus_records"] = len(records)
    save()
    # short: Ray's socket paths (<temp dir>/session_<date>_<pid>/sockets/...) must stay under 108 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="sfrg-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="ray-gpu-work-"))
    ray_started = False
    try:
        for key in ("in_process", "ray_1", "ray_2"):
            spent = time.perf_counter() - start
            if spent > args.budget_s:
                out[key] = f"skipped: {spent:.0f} s spent, budget {args.budget_s:.0f} s"
                save()
                continue
            print(f"# {key} ({spent:.0f} s in) ...", flush=True)
            ws = workspace(work / key, records, setup)
            try:
                if key == "in_process":
                    out[key] = in_process_run(ws, params, setup)
                    if device == "cuda":
                        torch.cuda.empty_cache()  # the workers share the GPU next
                else:
                    if not ray_started:
                        import ray

                        out["ray"], out["ray_module"] = ray.__version__, str(Path(ray.__file__).parent)
                        ray_started = True
                        out["ray_init_seconds"] = round(start_ray(setup, args.smoke, ray_tmp), 2)
                    out[key] = ray_run(ws, params, setup)
            except Exception as exc:  # one device run is precious: keep the other runs' figures
                if args.smoke:
                    raise
                traceback.print_exc()
                out[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            shutil.rmtree(ws.root, ignore_errors=True)  # checkpoints with optimizer state: keep the disk
            save()
        if ray_started:
            try:
                out["worker_probe"] = worker_probe(setup)
            except Exception as exc:
                out["worker_probe_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        if ray_started:
            import ray

            ray.shutdown()  # the Ray this script started, and nothing else
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    save()
    text = markdown(out)
    (out_dir / "ray_gpu.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
