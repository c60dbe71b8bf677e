"""bench/bench_deletions.py --smoke: requests arrive at a rate while the drain runs on its schedule, against the
same requests forgotten one at a time on a copy; every request is certified both ways, batching never trains
more, the figures are the ledger's times and the run reports' tokens, and the served weights end up the same."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import bench_deletions as bd  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("deletions")
    assert bd.main(["--smoke", "--out", str(out)]) == 0
    return json.loads((out / "deletions.json").read_text())


def test_every_request_is_certified_both_ways_and_the_weights_agree(smoke):
    s = smoke["summary"]
    n = bd.SMOKE.requests
    assert s["requests"] == n == 3
    assert s["batched"]["certified"] == s["one_at_a_time"]["certified"] == n
    assert s["batched"]["drains_that_failed"] == s["one_at_a_time"]["forgets_that_failed"] == 0
    assert s["same_weights_both_ways"] is True
    assert "yes (bitwise)" in smoke["text"]
    # the same owners, in the same order, both ways
    owners = [r["owner"] for r in smoke["requests"]["submitted"]]
    assert owners == [f["owner"] for f in smoke["forgets"]] and len(set(owners)) == n


def test_the_drain_batches_and_never_trains_more_than_one_at_a_time(smoke):
    s, runs = smoke["summary"], smoke["runs"]
    # requests come faster than a drain ends: some run applies more than one
    assert s["batched"]["runs"] < s["one_at_a_time"]["runs"] == s["requests"]
    assert sorted(r for run in runs["batched"] for r in run["requests"]) == sorted(
        smoke["requests"]["batched"]
    )
    assert all(len(run["requests"]) == 1 for run in runs["one_at_a_time"])
    # a shard is retrained once per run from its earliest touched slice: batching cannot cost more tokens
    assert s["batched"]["training_tokens"] <= s["one_at_a_time"]["training_tokens"]
    for way in ("batched", "one_at_a_time"):
        assert s[way]["training_tokens"] == sum(r["training_tokens"] for r in runs[way]) > 0
        assert s[way]["tokens_per_request"] == pytest.approx(s[way]["training_tokens"] / s["requests"])
    assert s["ratios"]["tokens_per_request"] == pytest.approx(
        s["batched"]["tokens_per_request"] / s["one_at_a_time"]["tokens_per_request"]
    )


def test_times_come_from_the_ledger_in_state_order(smoke):
    for way in ("batched", "one_at_a_time"):
        for rid, t in smoke["requests"][way].items():
            reached = [t[state] for state in ("pending", "excluded", "retrained", "purged", "certified")]
            assert all(x is not None for x in reached), (way, rid, t)
            assert reached == sorted(reached) and 0 <= reached[1] < reached[-1]
    s = smoke["summary"]
    b = [t["certified"] for t in smoke["requests"]["batched"].values()]
    assert s["batched"]["to_certified_s"] == {"median": pytest.approx(sorted(b)[1]), "worst": max(b), "n": 3}
    assert s["batched"]["to_excluded_s"]["worst"] < s["batched"]["to_certified_s"]["median"]
    assert s["batched"]["certified_per_hour"] > 0 and s["one_at_a_time"]["certified_per_hour"] > 0


def test_one_at_a_time_under_the_same_arrivals_is_a_queue():
    # three requests a second apart, each recorded in 0.5 s and forgotten in 3 s: each waits for the one before
    assert bd.fifo_latencies([0, 1, 2], [0.5, 0.5, 0.5], [3, 3, 3]) == [3.5, 5.5, 7.5]
    # far apart: no queue, each takes its own time
    assert bd.fifo_latencies([0, 100], [0.5, 1], [3, 4]) == [3.5, 5]
    assert bd.fifo_latencies([], [], []) == []
    assert math.isclose(bd.Setup(interval=10, duration=600).requests, 60)
