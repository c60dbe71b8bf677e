"""bench/lora_gpu.py --smoke (which runs bench/lora_quality.py on a tiny random base): every layout and way of
combining is measured, the forget retrains what the placement predicts, and the table and plot are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    import lora_gpu

    out = tmp_path_factory.mktemp("lora-smoke")
    assert lora_gpu.main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "lora.json").read_text())


def test_every_layout_and_combination_is_measured(smoke):
    out, res = smoke
    assert set(res["layouts"]) == {"monolithic", "S=2"}
    assert set(res["layouts"]["S=2"]) >= {"mixture", "product", "merge"}
    for row in [res["zero_shot"]["mixture"]] + [
        res["layouts"]["S=2"][c] for c in ("mixture", "product", "merge")
    ]:
        for group in ("retained", "never_seen"):
            lo, hi = row[group]["ci"]
            assert lo <= row[group]["ppl"] <= hi and row[group]["records"] == 8
        assert 0.0 <= row["rouge_l"]["recall"] <= 1.0 and row["rouge_l"]["questions"] == 3
    assert (out / "lora.md").read_text().count("| S=2 |") == 3 and (out / "lora.png").stat().st_size > 0


def test_training_has_equal_compute_and_the_forget_costs_what_the_placement_says(smoke):
    _, res = smoke
    mono, s2 = res["layouts"]["monolithic"], res["layouts"]["S=2"]
    assert mono["train"]["tokens"] == s2["train"]["tokens"] > 0  # same epochs over the same records
    # one shard, one slice: a forget retrains everything but the owner's own records (4 owners here)
    assert mono["expected_forget"]["model"] == 1.0 and 0.6 < mono["expected_forget"]["tokens"] < 0.9
    assert s2["expected_forget"]["model"] == pytest.approx(0.375)  # (1/2)(2+1)/(2*2)
    f = s2["forget"]
    assert 0 < f["tokens"] < s2["train"]["tokens"] and len(f["owners"]) == 1
    assert f["tokens_ratio"] == pytest.approx(f["tokens"] / s2["train"]["tokens"])
