"""`sisaflow evaluate` on a tiny workspace after a real forget: metrics, report and plots written, the before
snapshot kept as aggregates, DVC understands the metrics and plots, and no forgotten text is anywhere."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import yaml

from sisaflow import cli
from sisaflow.core import ledger, versioning
from sisaflow.core.paths import Workspace
from tests.integration.conftest import REPO, make_workspace, write_corpus
from tests.integration.procs import executable_beside

pytestmark = pytest.mark.integration

FORGET = "2"


def _perturbed(corpus_lines: list[dict], owner: str) -> list[dict]:
    """A TOFU-shaped perturbed file for `owner`'s questions: the true answer paraphrased as itself, other
    records' answers as the perturbed ones."""
    mine = [r for r in corpus_lines if str(r["author_id"]) == owner]
    others = [r["answer"] for r in corpus_lines if str(r["author_id"]) != owner][:3]
    return [
        {
            "question": r["question"],
            "answer": r["answer"],
            "paraphrased_answer": r["answer"],
            "perturbed_answer": others,
        }
        for r in mine
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, prefect_server):
    tmp = tmp_path_factory.mktemp("evaluate")
    corpus = write_corpus(tmp / "corpus.jsonl", 6)
    rows = [json.loads(ln) for ln in corpus.read_text().splitlines()]
    holdout = tmp / "holdout.jsonl"
    holdout.write_text(
        "\n".join((REPO / "data/tofu/holdout_records.jsonl").read_text().splitlines()[:60]) + "\n"
    )
    ws = make_workspace(tmp / "ws", corpus, shards=2, slices=2)
    # inside the workspace and committed, as the demo ships TOFU's: it holds the forgotten records' questions and
    # answers by design, and the scan must treat it as the user's input (as it treats the corpus source)
    perturbed = ws / "perturbed.json"
    perturbed.write_text(json.dumps(_perturbed(rows, FORGET)))
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["evaluate"].update(
        holdout=str(holdout), tofu_perturbed="perturbed.json", max_records=40, bootstrap=100, rouge_records=3
    )
    params["ensemble"]["combine"] = "posterior"  # so that the routing is reported too
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    versioning.git_commit(Workspace(ws), "evaluate params and inputs", ["params.yaml", "perturbed.json"])
    assert cli.main(["--workspace", str(ws), "run", "--in-process"]) == 0
    cmd = ["--workspace", str(ws), "forget", "--owner", FORGET, "--request-id", "r1", "--in-process"]
    assert cli.main(cmd) == 0
    assert ledger.current_state(ws / "deletions" / "ledger.jsonl") == {"r1": "certified"}
    assert cli.main(["--workspace", str(ws), "evaluate"]) == 0
    forgotten = [r for r in rows if str(r["author_id"]) == FORGET]
    return ws, forgotten


def test_metrics_report_and_plots(evaluated):
    ws, forgotten = evaluated
    m = json.loads((ws / "reports" / "metrics.json").read_text())
    assert m["groups"] == {"retained": 40, "never_seen": 40, "forgotten": len(forgotten)}
    for group in ("retained", "never_seen"):
        assert math.isfinite(m["utility"]["ensemble"][group]) and m["utility"]["ensemble"][group] > 1
        assert math.isfinite(m["utility"]["baseline"][group])
    assert [c["shard"] for c in m["utility"]["constituents"]] == [0, 1]
    for key in ("attacks_forgotten_vs_never_seen", "attacks_retained_vs_never_seen"):
        res = m["forgetting"][key]
        assert set(res) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
        for a in res.values():
            assert 0 <= a["low"] <= a["auc"] <= a["high"] <= 1
    assert m["forgetting"]["attacks_forgotten_vs_never_seen"]["loss"]["members"] == len(forgotten)
    assert 0 <= m["forgetting"]["verbatim"]["forgotten"]["rouge_l"] <= 1
    assert 0 <= m["forgetting"]["verbatim"]["forgotten"]["rouge_l_recall"] <= 1
    assert m["tofu"]["truth_ratio_forgotten"]["n"] == len(forgotten)
    assert m["tofu"]["forget_quality"] == 1.0

    [entry] = m["before_after"]
    assert entry["requests"] == ["r1"]
    assert entry["before"]["records"] == entry["after"]["records"] == len(forgotten)
    # the model before the deletion had trained on the records: it found them likelier than the model after
    assert entry["before"]["perplexity"] < entry["after"]["perplexity"]
    assert 0 <= entry["forget_quality_before"] <= 1 and entry["forget_quality_after"] == 1.0
    # where the posterior routes her records: her former shard's weight against never-seen records', both times
    for when in ("before", "after"):
        routing = entry[when]["routing_vs_never_seen"]
        assert 0 <= routing["low"] <= routing["auc"] <= routing["high"] <= 1
        assert routing["members"] == len(forgotten) and routing["nonmembers"] == 40
        assert 0 <= routing["mean_weight_forgotten"] <= 1 and 0 <= routing["mean_weight_never_seen"] <= 1

    report = (ws / "reports" / "report.md").read_text()
    assert "## Utility" in report and "## Forgetting" in report and "## Before and after" in report
    assert "| ROUGE-L F1 / recall of continuations |" in report
    assert "| routing: former shard's weight, AUC vs never-seen |" in report
    plots = sorted(p.name for p in (ws / "reports" / "plots").glob("*.png"))
    assert plots == ["before_after.png", "membership_auc.png", "utility.png"]
    for name in plots:
        assert (ws / "reports" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_forgotten_text_or_id_in_reports(evaluated):
    ws, forgotten = evaluated
    blobs = [p.read_bytes() for p in (ws / "reports").rglob("*") if p.is_file()]
    assert blobs
    for r in forgotten:
        for needle in (r["answer"].encode(), r["question"].encode(), r["id"].encode()):
            assert not any(needle in b for b in blobs)
    # and the whole scan (which covers reports/ too) is clean
    assert cli.main(["--workspace", str(ws), "verify"]) == 0


def test_dvc_reads_metrics_and_plots(evaluated):
    ws, _ = evaluated
    dvc = executable_beside("dvc")
    shown = subprocess.run([dvc, "metrics", "show", "--json"], cwd=ws, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    flat = json.dumps(data)
    assert "reports/metrics.json" in flat and "never_seen" in flat
    plots = subprocess.run([dvc, "plots", "show", "--json"], cwd=ws, capture_output=True, text=True)
    assert plots.returncode == 0, plots.stderr
    assert "membership_auc.png" in plots.stdout
    status = versioning.status(Workspace(ws), ["evaluate"])
    assert status == {}, status
