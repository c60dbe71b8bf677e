"""bench/cost_accounting.py: the expected forget cost from per-slice work, on cases with a known answer."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import cost_accounting as ca  # noqa: E402

from sisaflow.pipeline.report import cost_model as pipeline_cost_model  # noqa: E402


def uniform(
    shards: int, slices: int, per_cell: int = 3
) -> tuple[list[list[float]], dict[str, tuple[int, int]]]:
    """Equal work per slice and the same number of owners in every (shard, slice)."""
    work = [[10.0] * slices for _ in range(shards)]
    place = {f"{s}-{k}-{i}": (s, k) for s in range(shards) for k in range(slices) for i in range(per_cell)}
    return work, place


@pytest.mark.parametrize("shards,slices", [(1, 1), (1, 4), (2, 2), (4, 4), (8, 3)])
def test_uniform_single_deletion_is_the_cost_model(shards, slices):
    work, place = uniform(shards, slices)
    want = (slices + 1) / (2 * slices) / shards
    assert ca.expected_single(work, place) == pytest.approx(want, rel=1e-12)
    assert ca.expected_batch(work, place, 1) == pytest.approx(want, rel=1e-12)
    assert ca.cost_model(shards, slices) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("schedule", ["incremental", "cumulative"])
@pytest.mark.parametrize("shards,slices", [(1, 1), (2, 4), (8, 2)])
def test_cost_model_at_one_deletion_is_the_pipelines(shards, slices, schedule):
    assert ca.cost_model(shards, slices, 1, schedule) == pytest.approx(
        pipeline_cost_model(shards, slices, schedule), rel=1e-12
    )


def test_cumulative_work_per_slice_gives_the_cumulative_model():
    # cumulative: slice k trains on slices 0..k, so with equal slices it costs k + 1 units
    shards, slices = 4, 3
    work = [[float(k + 1) for k in range(slices)] for _ in range(shards)]
    place = {f"{s}-{k}": (s, k) for s in range(shards) for k in range(slices)}
    assert ca.expected_single(work, place) == pytest.approx((2 * slices + 1) / (3 * slices) / shards)


def test_batch_equals_brute_force_over_every_subset():
    rng = random.Random(3)
    shards, slices = 3, 3
    work = [[rng.uniform(1, 9) for _ in range(slices)] for _ in range(shards)]
    place = {f"o{i}": (rng.randrange(shards), rng.randrange(slices)) for i in range(9)}
    own = {o: rng.uniform(0, 0.5) for o in place}
    for k in (1, 2, 4, 9):
        subsets = list(itertools.combinations(sorted(place), k))
        brute = sum(ca.retrain_cost(work, place, c, own) for c in subsets) / len(subsets) / ca.total(work)
        assert ca.expected_batch(work, place, k, own) == pytest.approx(brute, rel=1e-12)
    assert ca.expected_batch(work, place, 1, own) == pytest.approx(ca.expected_single(work, place, own))


def test_known_small_cases():
    # one shard, an owner in each of two slices of cost 3 and 1: deleting the first retrains 4, the second 1
    work = [[3.0, 1.0]]
    place = {"a": (0, 0), "b": (0, 1)}
    assert ca.expected_single(work, place) == pytest.approx((4 / 4 + 1 / 4) / 2)
    assert ca.expected_batch(work, place, 2) == 1.0
    # the deleted records' own cost is not retrained
    assert ca.retrain_cost(work, place, ["b"], {"b": 0.25}) == 0.75
    # every owner deleted from every shard retrains everything
    work, place = uniform(4, 2, per_cell=1)
    assert ca.expected_batch(work, place, len(place)) == pytest.approx(1.0)


def test_cost_model_batch_grows_towards_everything():
    values = [ca.cost_model(4, 4, k) for k in (1, 2, 10, 100, 10_000)]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(1.0)
    # one shard, one slice: any deletion retrains everything
    assert ca.cost_model(1, 1, 5) == 1.0


def test_bad_k_is_refused():
    work, place = uniform(2, 2)
    with pytest.raises(ValueError, match="k must be"):
        ca.expected_batch(work, place, len(place) + 1)
