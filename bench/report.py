"""`make bench`: forget cost, utility, inference cost and orchestration overhead, all measured in one run.

    python bench/report.py [--quick] [--out reports/]

Writes OUT/bench.md (tables), OUT/bench.json (every number) and OUT/bench/*.png (plots):
  1. forget cost / full training over S in {1,2,4,8} x R in {1,2,4}, for one deletion and for a batch of K,
     measured, exactly expected over random owners (from this run's per-slice work), and the cost model;
  2. utility vs S: ensemble perplexity on never-seen and on training records; S=1 is the monolithic model
     with the same total compute (incremental slices: every record is trained on the same number of times);
  3. inference cost: generation tokens/s of the ensemble (batched and loop) vs one model, S = 1..8;
  4. orchestration overhead (Ray, Prefect, DVC) apart from training, against one shard's training.
Each layout trains in a temporary workspace on a subset of the shipped TOFU corpus (the first N authors), in this
process, one shard after another, on one CPU thread. The default run takes ~15 min on a 2-core machine, --quick
~2.5 min (smaller subset, one epoch, a shorter inference run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, when imported from elsewhere
SHARDS = [1, 2, 4, 8]
SLICES = [1, 2, 4]
DVC_LAYOUT = (4, 4)  # the repository's default layout: also measured with a real git + DVC workspace

PRESETS = {
    "default": {
        "authors": 64,
        "model": {"hidden_size": 64, "intermediate_size": 192},
        "train": {"epochs_per_slice": 2, "batch_size": 4},
        "k": 10,
        "eval_records": 100,
        "inference_sizes": [1, 2, 3, 4, 5, 6, 7, 8],
        "new_tokens": 64,
        "repeats": 3,
    },
    "quick": {
        "authors": 16,
        "model": {"hidden_size": 64, "intermediate_size": 192},
        "train": {"epochs_per_slice": 1, "batch_size": 4},
        "k": 4,
        "eval_records": 24,
        "inference_sizes": [1, 2, 4, 8],
        "new_tokens": 16,
        "repeats": 1,
    },
}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_subset(source: Path, authors: int, target: Path, owner_field: str) -> dict:
    """The records of the first `authors` owners of `source` (in file order), as JSONL at `target`."""
    keep: list[str] = []
    owners: list = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        owner = json.loads(line)[owner_field]
        if owner not in owners:
            if len(owners) == authors:
                continue
            owners.append(owner)
        keep.append(line)
    if len(owners) < authors:
        raise SystemExit(f"{source} has only {len(owners)} owners; asked for {authors}")
    target.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return {"owners": [str(o) for o in owners], "records": len(keep)}


def sample(records: list, n: int) -> list:
    """At most n records spread evenly over the content-hash order (deterministic, unrelated to placement)."""
    ordered = sorted(records, key=lambda r: r.content_hash)
    step = max(1.0, len(ordered) / n)
    return [ordered[int(i * step)] for i in range(min(n, len(ordered)))]


def build_setup(tmp: Path, preset: dict, seed: int):
    from forget_grid import Setup

    from sisaflow.core.config import Params
    from sisaflow.data.corpus import read_records

    repo = Params.load(REPO / "params.yaml")
    source = REPO / repo.corpus.path
    subset = write_subset(source, preset["authors"], tmp / "corpus.jsonl", repo.corpus.owner_field or "")
    corpus = dataclasses.replace(repo.corpus, path=str(tmp / "corpus.jsonl"))
    model = dataclasses.replace(repo.model, **preset["model"])
    train = dataclasses.replace(repo.train, **preset["train"], device="cpu", threads=1)
    params = dataclasses.replace(repo, corpus=corpus, model=model, train=train)
    members = read_records(tmp / "corpus.jsonl", corpus)
    holdout = read_records(REPO / "data/tofu/holdout_records.jsonl", corpus)
    setup = Setup(
        source=tmp / "corpus.jsonl",
        params=params,
        k=preset["k"],
        seed=seed,
        holdout=sample(holdout, preset["eval_records"]),
        members=sample(members, preset["eval_records"]),
    )
    info = {
        "corpus": str(source.relative_to(REPO)),
        "subset": f"the first {preset['authors']} authors (author_id in file order), {subset['records']} records",
        "owners": subset["owners"],
        "records": subset["records"],
        "holdout": "data/tofu/holdout_records.jsonl",
        "eval_records": {"holdout": len(setup.holdout), "train": len(setup.members)},
        "params": params.to_dict(),
        "k": preset["k"],
        "seed": seed,
    }
    return setup, info


def machine() -> dict:
    import torch

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smaller subset, one epoch, shorter inference run (~2.5 min)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "reports", help="output directory (default: reports/)")
    ap.add_argument("--seed", type=int, default=0, help="which owners are deleted")
    ap.add_argument("--from-json", type=Path, help="only render OUT again from an earlier run's bench.json")
    args = ap.parse_args()
    if args.from_json:
        from report_render import render

        result = json.loads(args.from_json.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        render(result, args.out)
        return 0
    for key, value in (
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("DVC_NO_ANALYTICS", "1"),
    ):
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(1)  # steadier on a shared machine; training uses train.threads = 1 anyway

    import forget_grid
    import overhead
    from inference_cost import inference_rates
    from report_render import render

    from sisaflow.core.config import Params

    mode = "quick" if args.quick else "default"
    preset = PRESETS[mode]
    t_run = time.perf_counter()
    result: dict = {
        "mode": mode,
        "preset": preset,
        "machine": machine(),
        "phases": {},
        "dvc_layout": DVC_LAYOUT,
    }
    with tempfile.TemporaryDirectory(prefix="sisaflow-bench-") as tmp_name:
        tmp = Path(tmp_name)
        setup, result["setup"] = build_setup(tmp, preset, args.seed)
        t0 = time.perf_counter()
        layouts = []
        for s in SHARDS:
            for r in SLICES:
                timer = overhead.dvc_timer if (s, r) == DVC_LAYOUT else None
                say(f"layout S={s} R={r}: full training, utility, single deletions, {setup.k} deletions")
                res = forget_grid.run_layout(tmp / f"S{s}R{r}", setup, s, r, timer)
                say(
                    f"  full {res['full']['tokens']:.0f} tokens {res['full']['seconds']:.1f} s; forget 1: "
                    f"{', '.join(format(x['tokens_ratio'], '.3f') for x in res['singles'])} "
                    f"(expected {res['expected']['single']['tokens']:.3f}); "
                    f"forget {setup.k}: {res['batch']['tokens_ratio']:.3f} "
                    f"(expected {res['expected']['batch']['tokens']:.3f}); {res['wall_seconds']:.0f} s"
                )
                layouts.append(res)
        result["layouts"] = layouts
        result["phases"]["grid"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("orchestration overhead: Ray")
    result["overhead"] = {"ray": overhead.ray_overhead()}
    say("orchestration overhead: Prefect (a fresh process with an ephemeral server)")
    result["overhead"]["prefect"] = overhead.prefect_overhead()
    result["phases"]["overhead"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"inference: S in {preset['inference_sizes']}")
    # the served model of the repository's params.yaml, not the grid's smaller one
    mp = Params.load(REPO / "params.yaml").model
    result["inference"] = {
        "model": dataclasses.asdict(mp),
        "new_tokens": preset["new_tokens"],
        "repeats": preset["repeats"],
        "rows": inference_rates(mp, preset["inference_sizes"], preset["new_tokens"], preset["repeats"]),
    }
    result["phases"]["inference"] = time.perf_counter() - t0

    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    result["run_seconds"] = time.perf_counter() - t_run
    args.out.mkdir(parents=True, exist_ok=True)
    render(result, args.out)
    say(
        f"wrote {args.out / 'bench.md'}, {args.out / 'bench.json'}, {args.out / 'bench'}/*.png in {result['run_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
