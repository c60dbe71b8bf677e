"""bench/graph_generate.py, issue 18's generation figures: its --smoke mode runs both sections on CPU (tiny
shapes, the static step run eagerly, transformers' static-cache generate() uncompiled), so the script a GPU
session runs cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import graph_generate as bench  # noqa: E402

from tests.unit.inference.test_stacked import rounding_bound  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("graph")
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    return json.loads((out / "graph.json").read_text()), (out / "graph.md").read_text()


@pytest.mark.parametrize("section", ["scratch", "lora"])
def test_every_size_is_measured_three_ways_with_its_bandwidth_bound(smoke, section):
    figures, text = smoke
    s = bench.SMOKE
    rows = figures[section]
    assert [r["S"] for r in rows] == sorted(s.sizes, reverse=True)  # the goal's largest S first
    for r in rows:
        assert min(r["one"], r["graph"]) > 0 and (r.get("eager", 0) > 0) == (r["S"] in s.eager)
        assert r["graph_vs_one"] == pytest.approx(r["graph"] / r["one"])
        assert not r["captured"] and r["capacity"] % 64 == 0 and r["capacity"] >= s.prompt + s.new
        assert (
            r["weights_bytes"] > 0
            and r["cache_bytes"] > 0
            and r["prefill_ms"] > 0
            and r["decode_step_ms"] > 0
        )
        assert r["step_vs_bound"] == pytest.approx(r["decode_step_ms"] / r["bound_ms"])
        assert r["bound_ms"] == pytest.approx(
            1e3 * (r["weights_bytes"] + r["cache_bytes"]) / bench.HBM_BYTES_PER_S
        )
    assert [r["S"] for r in rows if "compiled" in r] == list(s.compiled)
    assert all(r["compiled"] > 0 and r["compile_seconds"] > 0 for r in rows if "compiled" in r)
    assert "graph / one" in text and "step / bound" in text


@pytest.mark.parametrize("section", ["scratch", "lora"])
def test_the_graph_paths_distributions_are_compared_with_the_loop(smoke, section):
    """Float32 on CPU: the teacher-forced log-probabilities within the rounding bound of test_stacked (the
    magnitude of a log-probability over the vocabulary, the hidden width, layers times steps)."""
    figures, _ = smoke
    s = bench.SMOKE
    (row,) = [r for r in figures[section] if "numerics" in r]
    n = row["numerics"]
    assert n["steps"] == s.numerics_new and n["rows"] == s.batch
    bound = rounding_bound(
        2 * torch.log(torch.tensor(float(s.base_vocab))).item(), s.hidden, s.layers * s.numerics_new
    )
    assert 0 <= n["mean_abs_logprob_diff"] <= n["max_abs_logprob_diff"] <= bound
    assert 0 <= n["greedy_differs"] <= 1 and 0 <= n["same_rows"] <= n["rows"]
