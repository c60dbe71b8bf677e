"""bench/lora_gpu.py --smoke (which runs bench/lora_quality.py on a tiny random base): every layout and way of
combining is measured, the forget retrains what the placement predicts, and the table and plot are written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    import lora_gpu

    out = tmp_path_factory.mktemp("lora-smoke")
    assert lora_gpu.main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "lora.json").read_text())


def test_every_layout_and_combination_is_measured(smoke):
    import lora_quality as lq

    out, res = smoke
    assert set(res["layouts"]) == {"monolithic", "S=2"}
    s2 = res["layouts"]["S=2"]
    assert set(s2) >= set(lq.COMBINES)
    for row in [res["zero_shot"]["mixture"]] + [s2[c] for c in lq.COMBINES]:
        for group in ("retained", "never_seen", "validation"):
            lo, hi = row[group]["ci"]
            assert lo <= row[group]["ppl"] <= hi and row[group]["records"] == 8
        assert 0.0 <= row["rouge_l"]["recall"] <= 1.0 and row["rouge_l"]["questions"] == 3
        assert row["tokens_per_s"] > 0
        # the smoke's 4 authors (196-199) are all in forget10_perturbed.json: every question has its ratio
        assert row["truth_ratio"]["questions"] == res["data"]["truth_ratio_questions"] == 3
        assert row["truth_ratio"]["ci"][0] <= row["truth_ratio"]["mean"] <= row["truth_ratio"]["ci"][1]
    assert 0.0 <= s2["routing_accuracy"] <= 1.0
    md = (out / "lora.md").read_text()
    assert md.count("| S=2 |") == len(lq.COMBINES) and (out / "lora.png").stat().st_size > 0
    assert "Goal (S=8): not measured in this run." in md


def test_the_posterior_is_chosen_on_held_out_records_by_its_objective(smoke):
    import lora_quality as lq

    _, res = smoke
    choice = res["layouts"]["S=2"]["posterior_choice"]
    grid = choice["grid"]
    assert set(grid) == set(lq.grid_rules())
    objective = {
        n: math.log(g["validation"]["ppl"]) + math.log(g["never_seen"]["ppl"]) for n, g in grid.items()
    }
    assert f"posterior:{choice['beta']}:{choice['floor']}" == min(objective, key=objective.__getitem__)
    # beta 1 with no floor is the plain posterior rule, measured again in the table: the same numbers
    plain = res["layouts"]["S=2"]["posterior"]["never_seen"]["ppl"]
    assert grid["posterior:1.0:0.0"]["never_seen"]["ppl"] == pytest.approx(plain, rel=1e-12)
    # no layout trains on the held-out records
    assert res["data"]["validation_eval"] == 8 and res["data"]["records"] == 4 * (20 - lq.HELD_OUT)


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


def test_matched_steps_give_each_constituent_the_monolithic_steps_at_the_same_compute(tmp_path):
    import lora_quality as lq

    assert lq.main(["--smoke", "--match-steps", "--no-forget", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "lora.json").read_text())
    lay = res["layouts"]
    assert list(lay) == ["monolithic", "S=2", "S=2, steps matched"]  # side by side, in one run
    mono, plain, matched = lay["monolithic"], lay["S=2"], lay["S=2, steps matched"]
    assert mono["batch_size"] == plain["batch_size"] and not plain["matched"] and matched["matched"]
    assert matched["batch_size"] == max(1, mono["batch_size"] // 2)
    assert matched["train"]["tokens"] == mono["train"]["tokens"] == plain["train"]["tokens"]
    # other steps on the same records: another model
    assert matched["mixture"]["retained"]["ppl"] != plain["mixture"]["retained"]["ppl"]
    table = (tmp_path / "lora.md").read_text()
    assert "| S=2, steps matched | posterior |" in table and "- S=2, steps matched, top-1:" not in table


def test_truth_ratio_is_the_library_s_on_one_model(tmp_path):
    """The bench's truth ratio (from the kept per-token scores) is sisaflow.evaluation.tofu's on a one-model
    ensemble, to float32 rounding of the log-probabilities it averages."""
    import lora_quality as lq

    from sisaflow.evaluation.tofu import truth_ratios
    from sisaflow.inference.ensemble import Ensemble
    from sisaflow.models.pretrained import load_base_model
    from sisaflow.models.tokenizer import load_tokenizer

    base = lq.smoke_base(tmp_path)
    ens = Ensemble(
        [load_base_model(base, "cpu")], [1.0], "mixture", load_tokenizer("base", base), batched=False
    )
    rows = [r for r in lq.read_jsonl(lq.TOFU / "records.jsonl") if r["author_id"] == 199][:6]
    items = lq.truth_items(rows)
    assert len(items) == 6  # the last author's questions are in forget10_perturbed.json
    plan = lq.Plan(base, 1, (1,), 1, 1, 1e-3, 1, 1, 1, "cpu", 1, bootstrap=50)
    rows_, lengths = lq.truth_rows(ens, items)
    got = lq.truth_ratio_ci(ens, items, lengths, lq.row_scores(ens, rows_), "mixture", None, plan)
    want = truth_ratios(ens, items, [lq.as_record(r) for r in rows], lq.TEMPLATE)
    assert got["questions"] == len(want) == 6
    # each ratio is exp of a difference of two means of float32 log-probabilities, so its relative error is at
    # most twice one log-probability's: a float32 log_softmax over V logits rounds by about (log2 V + 4) eps32
    # times its magnitude, which for this untrained base is about log V (a near-uniform distribution)
    v = ens.tokenizer.vocab_size
    bound = 2 * (math.log2(v) + 4) * torch.finfo(torch.float32).eps * 2 * math.log(v)
    assert got["mean"] == pytest.approx(sum(want) / len(want), rel=bound)
    assert got["ci"][0] <= got["mean"] <= got["ci"][1]
