"""classify: a classification corpus trains as a generative one whose text ends with the class; the ensemble's
class distribution is each constituent's likelihood of each class after the text, combined by mean or vote."""

from __future__ import annotations

import json

import pytest
import torch

from sisaflow import cli
from sisaflow.cli import serving as commands_serving
from sisaflow.core.config import CorpusParams, ModelParams
from sisaflow.core.errors import ConfigError, CorpusError, WorkspaceError
from sisaflow.data.corpus import read_records
from sisaflow.inference.classify import class_log_likelihoods, classify, read_inputs, split_text
from sisaflow.inference.ensemble import Ensemble
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer
from tests.unit.inference.test_stacked import LAYERS, WIDTH, rounding_bound

TEMPLATE = "Message: {text}\nClass: {label}"
CP = dict(path="x", id_field="id", owner_field=None, text_template=TEMPLATE, label_field="label")


def _cp(labels=("ham", "spam"), **kw) -> CorpusParams:
    return CorpusParams(**{**CP, "labels": list(labels), **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(labels=None), "go together"),
        (dict(label_field=None), "go together"),
        (dict(labels=["ham", "ham"]), "distinct"),
        (dict(text_template="{label}: {text}"), "ends with {label}"),
        (dict(text_template="{label}"), "after some text"),
        (dict(text_template=None, text_field="text"), "ends with {label}"),
    ],
)
def test_classes_need_a_template_that_ends_with_the_class(kw, match):
    with pytest.raises(ConfigError, match=match):
        CorpusParams(**{**CP, "labels": ["ham", "spam"], **kw})  # type: ignore[arg-type]
    assert _cp().prompt_template == "Message: {text}\nClass: "


def test_a_record_whose_class_is_not_declared_is_refused_naming_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"id": "a", "text": "hi", "label": "ham"}\n{"id": "b", "text": "yo", "label": "eggs"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: field 'label' is 'eggs', not one of .*ham, spam"):
        read_records(f, _cp())
    f.write_text('{"id": "a", "text": "hi", "label": "ham"}\n{"id": "b", "text": "yo"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: missing field 'label'"):
        read_records(f, _cp())
    # to classify, the class may be absent (no gold class), but a present one must be declared
    inputs = read_inputs(f, _cp())
    assert [(x.record_id, x.prompt, x.gold) for x in inputs] == [
        ("a", "Message: hi\nClass: ", "ham"),
        ("b", "Message: yo\nClass: ", None),
    ]
    assert split_text("Message: hi\nClass: not spam", _cp(("spam", "not spam"))) == (
        "Message: hi\nClass: ",
        "not spam",
    )
    assert split_text("Message: hi\nClass: ham?", _cp()) is None


def _models(n: int, tokenizer: str, seed: int = 0):
    tok = load_tokenizer(tokenizer)
    mp = ModelParams(
        tokenizer=tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, context_length=64
    )
    models = []
    for s in range(n):
        m = build_model(mp, tok.vocab_size, tok.eos_id, seed + s)
        with torch.no_grad():  # sharper than the default init: class likelihoods that differ
            for p in m.parameters():
                if p.dim() == 2:
                    p.mul_(30.0)
        models.append(m.eval())
    return models, tok


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
@pytest.mark.parametrize("batched", [True, False])
def test_class_probabilities_are_the_whole_texts_likelihoods_normalised(tokenizer, batched):
    """Each constituent's class distribution equals softmax over classes of the log-likelihood of the whole
    training text (prompt + class + end-of-text), computed by the plain transformers model: the rows of one
    prompt differ only after their shared tokens, which cancel (GPT-2's tokens straddle ': ' + class)."""
    models, tok = _models(2, tokenizer)
    labels = ["ham", "spam", "not spam"]
    prompts = ["Message: see you at eight\nClass: ", "Message: WIN CASH\nClass: ", "M\nClass: "]
    ens = Ensemble(models, [1.0, 3.0], "mixture", tok, batched=batched)
    ll = class_log_likelihoods(ens, prompts, labels, batch_size=4)
    assert ll.shape == (2, 3, 3)
    for s, m in enumerate(models):
        for n, p in enumerate(prompts):
            whole = []
            for c in labels:
                ids = torch.tensor([tok.encode(p + c) + [tok.eos_id]])
                with torch.no_grad():
                    lp = torch.log_softmax(m(input_ids=ids).logits[0, :-1].double(), dim=-1)
                whole.append(float(lp.gather(-1, ids[0, 1:, None]).sum()))
            expected = torch.softmax(torch.tensor(whole, dtype=torch.float64), dim=0)
            # each whole-text log-likelihood sums T float32 log-probabilities, each within rounding_bound of the
            # plain model's (batched and padded rows, another kernel); softmax moves no more than its inputs do
            tokens = max(len(tok.encode(p + c)) + 1 for c in labels)
            bound = tokens * rounding_bound(max(abs(w) for w in whole), WIDTH, LAYERS)
            assert float((torch.softmax(ll[s, n], dim=0) - expected).abs().max()) <= bound
    assert (ll[0] - ll[1]).abs().max() > 0.1  # the constituents disagree, so a mix-up would show


def test_mean_and_vote_combine_the_constituents_class_probabilities():
    models, tok = _models(3, "byte", seed=5)
    ens = Ensemble(models, [0.5, 0.3, 0.2], "mixture", tok)
    labels = ["ham", "spam"]
    prompts = [f"Message: text number {i}\nClass: " for i in range(6)]
    q = torch.softmax(class_log_likelihoods(ens, prompts, labels), dim=-1)  # (S, N, C)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mean = (w[:, None, None] * q).sum(0)
    top = q.argmax(-1)
    for rule in ("mean", "vote"):
        preds = classify(ens, prompts, labels, rule)
        for n, p in enumerate(preds):
            assert p.probabilities == pytest.approx({c: float(mean[n, k]) for k, c in enumerate(labels)})
            votes = {c: float(w[top[:, n] == k].sum()) for k, c in enumerate(labels)}
            assert p.votes == pytest.approx(votes) and sum(p.votes.values()) == pytest.approx(1.0)
            if rule == "mean":
                assert p.label == labels[int(mean[n].argmax())]
            else:
                assert p.label == max(labels, key=lambda c: (votes[c], p.probabilities[c]))
    with pytest.raises(ValueError, match="unknown rule"):
        classify(ens, prompts, labels, "median")


def _labelled(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        if i % 2:
            rows.append({"id": f"m{i}", "text": f"WIN {i} CASH PRIZE, call now!", "label": "spam"})
        else:
            rows.append({"id": f"m{i}", "text": f"see you at {i} tonight, ok?", "label": "ham"})
    return rows


def test_a_trained_classification_workspace_classifies_unseen_messages(
    tmp_path, make_served, make_params, capsys, monkeypatch
):
    """Two constituents trained on labelled messages tell unseen spam from ham; `sisaflow classify` writes one
    JSONL row per record (ids and classes, no text) and the accuracy."""
    corpus = {**CP, "path": "records.jsonl", "text_field": None, "labels": ["ham", "spam"]}
    params = make_params(
        corpus=corpus,
        sharding={"shards": 2, "slices": 1},
        train={"epochs_per_slice": 12, "warmup_steps": 0, "learning_rate": 0.01},
    )
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _labelled(64)))
    ws = make_served(read_records(source, params.corpus), params)

    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text("".join(json.dumps(r) + "\n" for r in _labelled(20, start=1000)))
    inputs = read_inputs(unseen, params.corpus)
    preds = classify(Ensemble.load(ws), [x.prompt for x in inputs], ["ham", "spam"])
    accuracy = sum(p.label == x.gold for p, x in zip(preds, inputs)) / len(inputs)
    assert accuracy >= 0.9, accuracy
    # `sisaflow evaluate` reads the class back from training-form texts: the same predictions
    from sisaflow.inference.classify import accuracy as accuracy_of

    assert accuracy_of(Ensemble.load(ws), read_records(unseen, params.corpus), params.corpus, "mean") == {
        "accuracy": accuracy,
        "records": 20,
    }

    out = tmp_path / "classes.jsonl"
    monkeypatch.setattr(commands_serving, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    args = ["--workspace", str(ws.root), "classify", str(unseen), "--out", str(out), "--rule", "vote"]
    assert cli.main([*args, "--batch-size", "8"]) == 0
    said = capsys.readouterr()
    assert said.err.splitlines() == [f"classified {n}/20 records" for n in (8, 16, 20)]
    assert "20 record(s) classified (vote of 2 constituent(s)); accuracy" in said.out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [x.record_id for x in inputs]
    assert all(set(r) == {"id", "label", "probabilities", "votes", "gold"} for r in rows)
    assert "CASH" not in out.read_text() and "tonight" not in out.read_text()  # no text of the records
    assert cli.main(["--workspace", str(ws.root), "classify", str(unseen), "--batch-size", "0"]) == 1
    assert "--batch-size must be at least 1, not 0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "hi", "label": "ham"}\n{"id": "y", "label": "spam"}\n')
    none = tmp_path / "none.jsonl"
    assert cli.main(["--workspace", str(ws.root), "classify", str(bad), "--out", str(none)]) == 1
    assert "bad.jsonl:2: missing field 'text'" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if "none" in p.name]  # no output, partial or whole


def test_classify_in_a_generative_workspace_says_what_to_set(
    make_served, make_records, make_params, tmp_path, capsys
):
    params = make_params(sharding={"shards": 1, "slices": 1})
    ws = make_served(make_records(owners=2, per_owner=2), params)
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": "a", "text": "hi"}\n')
    assert cli.main(["--workspace", str(ws.root), "classify", str(f)]) == 1
    assert "corpus has no classes: set corpus.label_field" in capsys.readouterr().err
    with pytest.raises(WorkspaceError):
        read_inputs(f, params.corpus)
