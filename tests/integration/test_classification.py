"""A classification corpus end to end, without Prefect: init with classes, run, classify, forget a message,
the retrained constituent equal to one trained from scratch, and the accuracy in `sisaflow evaluate`."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.integration.conftest import REPO, make_workspace

pytestmark = pytest.mark.integration

SMS = REPO / "data" / "sms_spam"
FIELDS = [
    "--id-field",
    "id",
    "--text-template",
    "Message: {text}\\nClass: {label}",
    "--label-field",
    "label",
    "--labels",
    "ham,spam",
]


def _subset(path, spam: int, ham: int) -> list[str]:
    out, counts = [], {"spam": 0, "ham": 0}
    for line in path.read_text(encoding="utf-8").splitlines():
        label = json.loads(line)["label"]
        if counts[label] < {"spam": spam, "ham": ham}[label]:
            counts[label] += 1
            out.append(line)
    return out


def test_a_classification_corpus_runs_classifies_and_forgets_exactly(tmp_path, capsys):
    from sisaflow import cli
    from sisaflow.core import ledger
    from sisaflow.core.paths import Workspace

    corpus = tmp_path / "sms.jsonl"
    corpus.write_text("\n".join(_subset(SMS / "records.jsonl", 40, 80)) + "\n", encoding="utf-8")
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("\n".join(_subset(SMS / "holdout.jsonl", 10, 20)) + "\n", encoding="utf-8")
    root = make_workspace(tmp_path / "ws", corpus, shards=2, slices=2, fields=FIELDS)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["corpus"]["labels"] == ["ham", "spam"] and params["corpus"]["label_field"] == "label"
    params["evaluate"].update(holdout=str(holdout), tofu_perturbed=None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ws = ["--workspace", str(root)]

    assert cli.main([*ws, "run", "--no-prefect", "--in-process"]) == 0
    out = tmp_path / "classes.jsonl"
    assert cli.main([*ws, "classify", str(holdout), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and {r["gold"] for r in rows} == {"ham", "spam"}
    for r in rows:
        assert r["label"] in ("ham", "spam") and sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert "accuracy" in capsys.readouterr().out

    spam_id = next(json.loads(line)["id"] for line in corpus.read_text().splitlines() if '"spam"' in line)
    assert cli.main([*ws, "forget", "--record", spam_id, "--no-prefect", "--in-process"]) == 0
    (state,) = {s for s in ledger.current_state(Workspace(root).ledger_file).values()}
    assert state == "certified"
    capsys.readouterr()
    assert cli.main([*ws, "verify", "--exact"]) == 0  # every served shard equals training from scratch
    assert "DIFFERENT" not in capsys.readouterr().out

    assert cli.main([*ws, "evaluate", "--no-baseline", "--no-dvc"]) == 0
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    c = metrics["classification"]
    assert c["rule"] == "mean" and c["never_seen"]["records"] == 30 and c["forgotten"]["records"] == 1
    assert 0.0 <= c["retained"]["accuracy"] <= 1.0 and c["retained"]["records"] == 119
    assert "## Classification" in (root / "reports" / "report.md").read_text()
