"""Benchmark: a full training and a forget of one owner on the default corpus, next to the cost model.

Runs in one process through the same Prefect flows as `sisaflow run` / `sisaflow forget`, in a temporary copy of
the repository's workspace configuration (params.yaml, the shipped TOFU corpus). Prints:
  - training work (tokens) and training time (seconds inside the Ray workers) of the forget vs the full training;
  - the expected forget cost over every owner, from the per-slice work measured in this run;
  - the cost model (1/S)(R+1)/(2R) (or (1/S)(2R+1)/(3R) for cumulative slices);
  - fixed overheads apart: Ray start, Prefect (flow wall time not spent in any step), DVC commit.
Usage: python bench/forget_cost.py [--owner ID] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--owner", default="199", help="owner to forget (default: TOFU's forget01 author 199)")
    ap.add_argument("--keep", help="build the workspace here and keep it (default: a temporary directory)")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sisaflow-bench-"))
    if root.exists():
        shutil.rmtree(root)
    import yaml

    from sisaflow.core.config import CorpusParams, Params, ShardingParams
    from sisaflow.pipeline.create import init_workspace

    repo_params = Params.load(REPO / "params.yaml")
    cp = repo_params.corpus
    corpus = REPO / cp.path
    ws = init_workspace(
        root,
        corpus,
        CorpusParams(**{**cp.__dict__, "path": str(corpus)}),
        ShardingParams(repo_params.sharding.shards, repo_params.sharding.slices),
    )
    raw = yaml.safe_load(ws.params_file.read_text())
    for section in ("model", "train", "ensemble", "ray"):
        raw[section] = repo_params.to_dict()[section]
    ws.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.environ["PREFECT_HOME"] = str(ws.prefect_home)
    ws.prefect_home.mkdir(parents=True, exist_ok=True)

    from sisaflow.data.sharding import shard_of, slice_of
    from sisaflow.deletion.requests import request_deletion
    from sisaflow.flows.forget import forget_flow
    from sisaflow.flows.training import training_flow
    from sisaflow.pipeline.report import cost_model

    params = Params.load(ws.params_file)
    S, R = params.sharding.shards, params.sharding.slices
    t0 = time.perf_counter()
    full = training_flow(workspace=str(ws.root))
    full_wall = time.perf_counter() - t0
    request_deletion(ws, [args.owner], [], request_id="bench-forget", reason="test")
    t0 = time.perf_counter()
    forget = forget_flow(workspace=str(ws.root), request_id="bench-forget")
    forget_wall = time.perf_counter() - t0

    fr, gr = full.report.to_json(), forget.report.to_json()
    model = cost_model(S, R, params.train.schedule)

    full_tokens = fr["training_tokens"]
    full_secs = sum(t["seconds"] for t in fr["trained"].values())
    forget_tokens = gr["training_tokens"]
    forget_secs = sum(t["seconds"] for t in gr["trained"].values())
    shard, slice_ = shard_of(args.owner, S), slice_of(args.owner, R)

    expected = _expected_over_owners(ws, params, fr)

    def overhead(rep, wall):
        steps = sum(v for k, v in rep["seconds"].items() if k != "ray_start")
        return {
            "ray_start": rep["seconds"].get("ray_start", 0.0),
            "dvc": rep["seconds"].get("dvc", 0.0),
            "prefect": max(0.0, wall - steps),
            "train_step_wall": rep["seconds"].get("train", 0.0),
        }

    lines = [
        f"sisaflow benchmark: S={S} shards, R={R} slices, schedule {params.train.schedule}, "
        f"{fr['imported']['records']} records, model {params.model.tokenizer} h{params.model.hidden_size} "
        f"x{params.model.layers}, {os.cpu_count()} CPU",
        "",
        f"full training : {full_tokens:>9} tokens  {full_secs:7.1f} s in workers   (wall {full_wall:.1f} s)",
        f"forget owner {args.owner} (shard {shard}, slice {slice_}): {forget_tokens:>9} tokens  {forget_secs:7.1f} s "
        f"in workers   (wall {forget_wall:.1f} s)",
        "",
        f"forget/full, this owner : tokens {forget_tokens / full_tokens:.3f}   time {forget_secs / full_secs:.3f}",
        f"forget/full, expected over all owners (from this run's per-slice work): "
        f"tokens {expected['tokens']:.3f}   time {expected['seconds']:.3f}",
        f"cost model {'(1/S)(2R+1)/(3R)' if params.train.schedule == 'cumulative' else '(1/S)(R+1)/(2R)'}"
        f" = {model:.3f}",
        f"expected/model: tokens {expected['tokens'] / model:.2f}x   time {expected['seconds'] / model:.2f}x"
        "   (goal: within 1.5x)",
        "",
        "fixed overhead, seconds (not training):",
    ]
    for name, rep, wall, secs in (
        ("full", fr, full_wall, full_secs),
        ("forget", gr, forget_wall, forget_secs),
    ):
        o = overhead(rep, wall)
        lines.append(
            f"  {name:6s}: Ray start {o['ray_start']:.1f}; train step {o['train_step_wall']:.1f} wall for "
            f"{secs:.1f} of in-worker training ({len(rep['trained'])} shard(s) on {os.cpu_count()} CPU); "
            f"DVC commit {o['dvc']:.1f}; Prefect {o['prefect']:.1f}"
        )
    print("\n".join(lines))
    out = {
        "full": fr,
        "forget": gr,
        "expected": expected,
        "cost_model": model,
        "wall": {"full": full_wall, "forget": forget_wall},
    }
    (ws.runs_dir / "bench.json").write_text(json.dumps(out, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _expected_over_owners(ws, params, full_report) -> dict[str, float]:
    """Mean over owners of the fraction of full-training work a forget of that owner retrains."""
    from sisaflow.data.corpus import from_table, read_table
    from sisaflow.data.sharding import shard_of, slice_of
    from sisaflow.training.checkpoint import read_meta

    S, R = params.sharding.shards, params.sharding.slices
    tokens = {}
    for s in range(S):
        prev = 0
        for k in range(R):
            meta = read_meta(ws.checkpoint_dir(s, k))
            tokens[(s, k)] = meta.tokens_seen - prev
            prev = meta.tokens_seen
    total_tokens = sum(tokens.values())
    # owners of the corpus now (the forgotten one is gone; one of many, so the mean barely moves)
    owners = sorted({r.owner for r in from_table(read_table(ws.corpus_file))})
    frac_tokens = 0.0
    for o in owners:
        s, k = shard_of(o, S), slice_of(o, R)
        frac_tokens += sum(tokens[(s, j)] for j in range(k, R)) / total_tokens
    frac_tokens /= len(owners)
    # time: scale each shard's measured seconds by its share of tokens from slice k on
    trained = {int(k): v for k, v in full_report["trained"].items()}
    total_secs = sum(v["seconds"] for v in trained.values())
    frac_secs = 0.0
    for o in owners:
        s, k = shard_of(o, S), slice_of(o, R)
        shard_tokens = sum(tokens[(s, j)] for j in range(R))
        share = sum(tokens[(s, j)] for j in range(k, R)) / shard_tokens
        frac_secs += trained[s]["seconds"] * share / total_secs
    frac_secs /= len(owners)
    return {"tokens": frac_tokens, "seconds": frac_secs}


if __name__ == "__main__":
    sys.exit(main())
