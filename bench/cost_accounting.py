"""What a deletion retrains, as a fraction of a full training: exact expectations from one training's per-slice
work, and the idealised cost model. Pure Python (no torch), so the unit test runs in milliseconds.

`work[s][k]` is what slice k of shard s cost in the full training (tokens, or seconds), in any unit. Deleting
owners whose earliest slice in shard s is m retrains slices m..R-1 of shard s (train_shard resumes from the
checkpoint after slice m-1), minus the deleted records themselves, which are gone from those slices; other
shards are not touched. `own[o]` is what owner o's own records cost in the full training (0 to ignore it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Work = Sequence[Sequence[float]]
Place = Mapping[str, tuple[int, int]]  # owner -> (shard, slice)


def total(work: Work) -> float:
    """The cost of the full training."""
    return float(sum(sum(row) for row in work))


def suffix(work: Work, shard: int, first: int) -> float:
    """The cost of retraining `shard` from slice `first` to its last slice."""
    return float(sum(work[shard][first:]))


def retrain_cost(
    work: Work, place: Place, owners: Sequence[str], own: Mapping[str, float] | None = None
) -> float:
    """Cost of one retraining after deleting `owners` together: each touched shard once, from its earliest
    touched slice."""
    first: dict[int, int] = {}
    for o in owners:
        s, k = place[o]
        first[s] = min(k, first.get(s, k))
    removed = sum((own or {}).get(o, 0.0) for o in set(owners))
    return sum(suffix(work, s, k) for s, k in first.items()) - removed


def expected_single(work: Work, place: Place, own: Mapping[str, float] | None = None) -> float:
    """Mean over owners (each equally likely to ask) of the fraction of the full training a deletion retrains."""
    if not place:
        raise ValueError("no owners: the expectation over owners is undefined")
    full = total(work)
    return sum(retrain_cost(work, place, [o], own) for o in place) / len(place) / full


def expected_batch(work: Work, place: Place, k: int, own: Mapping[str, float] | None = None) -> float:
    """Expected fraction retrained by one retraining after deleting `k` distinct owners drawn uniformly at random
    (without replacement), exactly: per shard, the hypergeometric law of its earliest touched slice.

    P(no drawn owner among a set of a owners) = C(N - a, k) / C(N, k); the earliest touched slice of shard s is
    m exactly when none is drawn from s's slices < m and one is from slice m.
    """
    n = len(place)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of owners), got {k}")
    slices = max(len(row) for row in work)
    counts = [[0] * slices for _ in work]
    for s, j in place.values():
        counts[s][j] += 1
    ways = math.comb(n, k)
    expected = 0.0
    for s, row in enumerate(counts):
        below = 0  # owners of shard s in slices < m
        for m in range(slices):
            p_none_below = math.comb(n - below, k) / ways
            p_none_through = math.comb(n - below - row[m], k) / ways
            expected += (p_none_below - p_none_through) * suffix(work, s, m)
            below += row[m]
    mean_own = sum((own or {}).get(o, 0.0) for o in place) / n
    return (expected - k * mean_own) / total(work)


def cost_model(shards: int, slices: int, k: int = 1, schedule: str = "incremental") -> float:
    """Expected fraction of a full training retrained after k deletions, in the idealised model: equal shards
    and slices, each deletion's (shard, slice) uniform and independent. Slice j costs 1 (incremental) or j + 1
    (cumulative: slices 0..j). For k = 1 this is (1/S)(R+1)/(2R), resp. (1/S)(2R+1)/(3R).

    A shard retrains from its earliest touched slice m; P(m <= j) = 1 - (1 - (j+1)/(S R))^k, and slice j is
    retrained exactly when m <= j, so E = sum_j (w_j / W) P(m <= j) summed over the S shards of weight 1/S.
    """
    if schedule not in ("incremental", "cumulative"):
        raise ValueError(f"unknown schedule {schedule!r}; choose incremental or cumulative")
    w = [1.0 if schedule == "incremental" else j + 1.0 for j in range(slices)]
    cells = shards * slices
    return sum(wj / sum(w) * (1 - (1 - (j + 1) / cells) ** k) for j, wj in enumerate(w))
