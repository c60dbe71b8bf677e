"""Probe: S=8, R=4 with the monolithic's optimizer steps (batch 8 // 8 = 1), perplexities only (mixture,
posterior), on the same data as bench/lora_quality.py's run (deterministic training: the plain layouts'
numbers of that run are what these compare with). Run: .venv/bin/python bench/results/lora-s8-2026-12-08/probe_matched.py"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "src"), str(REPO)]
import forget_grid as fg  # noqa: E402
import lora_quality as lq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from sisaflow.data.sharding import shard_corpus  # noqa: E402
from sisaflow.inference.ensemble import Ensemble  # noqa: E402
from sisaflow.inference.registry import build_registry  # noqa: E402

plan = lq.Plan(
    base=str(REPO / "bases" / "smollm2-135m-instruct"),
    authors=32,
    shards=(8,),
    slices=4,
    epochs=2,
    learning_rate=3e-3,
    eval_records=100,
    questions=40,
    new_tokens=40,
    device="cpu",
    threads=2,
    match_steps=True,
)
torch.set_num_threads(2)
out = {}
with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
    root = Path(tmp)
    source, chosen, holdout = lq.subset(plan, root)
    params = lq.params_for(plan)
    members = [lq.as_record(r) for r in chosen]
    data = {
        "retained": lq.fg_sample(members, plan.eval_records),
        "never_seen": lq.fg_sample([lq.as_record(r) for r in holdout], plan.eval_records),
        "validation": lq.fg_sample(lq.validation(plan), plan.eval_records),
    }
    setup = fg.Setup(source=source, params=params, k=1, seed=plan.seed, holdout=[], members=[])
    ws, params = fg.workspace(root / "S8m", setup, 8, 4)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, batch_size=1))
    ws.params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    shard_corpus(ws, params.sharding)
    full = fg.train(ws, params, params.sharding.shard_ids)
    out["train"] = {"tokens": full["tokens"], "seconds": full["seconds"]}
    print("trained", out["train"], flush=True)
    build_registry(ws, params)
    ens = Ensemble.load(ws, device="cpu")
    for group in lq.SCORED_GROUPS:
        sc = lq.rule_scores(
            ens, lq.constituent_scores(ens, data[group]), ("mixture", "posterior", "posterior:0.5:0.5")
        )
        out[group] = {c: lq.perplexity_ci(v, 1000, 0) for c, v in sc.items()}
        print(group, {c: round(v["ppl"], 2) for c, v in out[group].items()}, flush=True)
Path(__file__).with_name("matched-probe.json").write_text(json.dumps(out, indent=1))
