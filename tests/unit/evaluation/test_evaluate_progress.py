"""Progress of `evaluate` and `verify --exact`: their meters count every record scored and continued, and every
shard retrained, up to the totals they announced; shard trainings inside count their steps too."""

from __future__ import annotations

import dataclasses

from sisaflow.core import progress
from sisaflow.core.config import ShardingParams
from sisaflow.evaluation import evaluate
from sisaflow.pipeline.exactness import verify_exact


def _counts(seen, desc):
    return [(done, total) for what, done, total in seen if what == desc]


def _to_total(counts):
    done = [d for d, _ in counts]
    totals = {t for _, t in counts}
    return bool(counts) and done == sorted(set(done)) and len(totals) == 1 and done[-1] == totals.pop()


def test_evaluate_counts_every_record_it_scores_and_continues(make_served, make_records, make_params):
    params = make_params(
        sharding={"shards": 2, "slices": 2}, evaluate={"rouge_records": 5, "rouge_new_tokens": 4}
    )
    ws = make_served(make_records(owners=6, per_owner=4), params)
    with progress.watch() as seen:
        result = evaluate.evaluate(ws, params, baseline=False)
    scoring, generating = _counts(seen, "evaluate: scoring"), _counts(seen, "evaluate: generating")
    assert _to_total(scoring) and _to_total(generating)
    groups = result["groups"]
    assert scoring[-1][1] == groups["retained"] + groups["never_seen"] + groups["forgotten"] == 24
    # no holdout, nothing forgotten: the retained group's first rouge_records records are continued
    assert generating[-1][1] == 5 == result["forgetting"]["verbatim"]["retained"]["records"]


def test_verify_exact_counts_the_shards_it_retrains(make_workspace, make_records, tiny_params):
    from sisaflow.inference.registry import build_registry
    from sisaflow.training.loop import train_shard

    params = dataclasses.replace(tiny_params, sharding=ShardingParams(shards=2, slices=2))
    ws = make_workspace(make_records(owners=4, per_owner=3), shards=2, slices=2)
    for s in (0, 1):
        train_shard(ws, s, params, progress=lambda m: None)
    build_registry(ws, params)
    with progress.watch() as seen:
        results = verify_exact(ws, params)
    assert all(r.equal for r in results)
    assert _counts(seen, "verify --exact") == [(1, 2), (2, 2)]
    for s in (0, 1):  # each retraining from scratch shows its steps
        assert _to_total(_counts(seen, f"shard {s}"))
