"""evaluation: batched, right-padded scoring gives each record the log-likelihood `Ensemble.score` gives it alone,
per constituent too; samples are deterministic; a memorised group is told apart from an unseen one."""

from __future__ import annotations

import math

import pytest
import torch

from sisaflow.core.config import ModelParams
from sisaflow.data.corpus import Record, content_hash
from sisaflow.evaluation import evaluate, metrics
from sisaflow.inference.ensemble import Ensemble
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import ByteTokenizer

TINY = ModelParams(hidden_size=32, layers=2, heads=2, intermediate_size=64, context_length=128)


def _records(texts: list[str]) -> list[Record]:
    return [Record(f"r{i}", f"o{i}", t, content_hash(f"r{i}", t)) for i, t in enumerate(texts)]


def _ensemble(n: int = 2, batched: bool = True) -> Ensemble:
    tok = ByteTokenizer()
    models = [build_model(TINY, tok.vocab_size, tok.eos_id, seed=s).eval() for s in range(n)]
    return Ensemble(models, [1.0] * n, "mixture", tok, batched)


TEXTS = ["a", "Question: who?\nAnswer: nobody", "x" * 90, "short one", "the cat sat on the mat " * 3]


def test_batched_scores_equal_one_record_at_a_time():
    ens = _ensemble()
    recs = _records(TEXTS)
    scored = evaluate.score_records(ens, recs, {"r1": 0, "r3": 1}, batch_size=3)
    assert [s.shard for s in scored] == [-1, 0, -1, 1, -1]
    for r, s in zip(recs, scored):
        alone = ens.score(r.text)
        assert s.tokens == alone["tokens"]
        assert math.isclose(float(s.ensemble.token_log_probs.sum()), alone["log_likelihood"], rel_tol=1e-6)
    # per constituent: the same as an ensemble of that model alone
    for i in range(2):
        single = Ensemble(
            [ens.constituents[i]],
            [1.0],
            "mixture",
            ens.tokenizer,
        )
        for r, s in zip(recs, scored):
            assert math.isclose(
                float(s.constituents[i].token_log_probs.sum()),
                single.score(r.text)["log_likelihood"],
                rel_tol=1e-6,
            )
    assert math.isclose(
        evaluate.perplexity(scored),
        math.exp(
            -sum(ens.score(t)["log_likelihood"] for t in TEXTS) / sum(ens.score(t)["tokens"] for t in TEXTS)
        ),
        rel_tol=1e-6,
    )


def test_sample_is_deterministic_and_spread():
    recs = _records([f"text {i}" for i in range(50)])
    a = evaluate.sample(recs, 10)
    assert len(a) == 10 and a == evaluate.sample(list(reversed(recs)), 10)
    assert evaluate.sample(recs, 100) == sorted(recs, key=lambda r: r.content_hash)


def test_attacks_tell_a_memorised_group_from_an_unseen_one():
    """A constituent trained to memorise one group scores it far likelier than a fresh group: AUC near 1."""
    torch.manual_seed(0)
    ens = _ensemble(1, batched=False)
    model = ens.constituents[0]
    members = _records([f"member number {i} says {'abc' * (i % 3 + 1)} and zz{i}" for i in range(12)])
    others = _records([f"other person {i} wrote {'xyz' * (i % 3 + 1)} then qq{i}" for i in range(12)])
    tok = ens.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = [tok.encode(r.text) + [tok.eos_id] for r in members]
    width = max(map(len, batch))
    x = torch.tensor([b + [tok.eos_id] * (width - len(b)) for b in batch])
    labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
    model.train()
    for _ in range(150):
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ens = Ensemble([model], [1.0], "mixture", tok, batched=False)

    class EP:
        min_k, bootstrap, seed = 0.2, 200, 0

    res = evaluate.attacks(
        evaluate.score_records(ens, members, {}), evaluate.score_records(ens, others, {}), EP
    )
    for name in ("loss", "min_k", "min_k_plus_plus"):
        assert res[name]["auc"] > 0.9, (name, res[name])
    same = evaluate.attacks(
        evaluate.score_records(ens, others[:6], {}), evaluate.score_records(ens, others[6:], {}), EP
    )
    # two halves of one unseen group: every interval covers 0.5
    assert all(v["low"] <= 0.5 <= v["high"] for v in same.values()), same


def test_verbatim_generates_in_batches_what_each_record_gets_alone(monkeypatch):
    """The batched continuations are the ones each record's first half gets generated on its own."""
    ens = _ensemble(2)
    with torch.no_grad():  # sharper than the default init, so greedy choices are not near-ties
        for p in ens.runner.parameters():
            if p.dim() >= 3:
                p.mul_(40.0)
    texts = [f"record {i}: {'abc ' * (i % 4 + 1)}and some words {i * 7} here" for i in range(11)] + ["a"]
    recs = _records(texts)
    tok = ens.tokenizer
    alone = []
    for r in recs[:11]:
        ids = tok.encode(r.text)
        half = len(ids) // 2
        alone.append(
            (tok.decode(ids[half : half + 8]), ens.generate(tok.decode(ids[:half]), max_new_tokens=8))
        )
    assert len({c for _, c in alone}) > 3  # the continuations differ, so a mix-up of rows would show
    seen: list[tuple[str, str]] = []
    scores = iter([metrics.RougeL(1.0, 0.25 * (i % 2), 0.5) for i in range(11)])
    monkeypatch.setattr(
        evaluate.metrics, "rouge_l_scores", lambda ref, cont: seen.append((ref, cont)) or next(scores)
    )
    monkeypatch.setattr(
        evaluate, "GENERATE_BATCH", 4
    )  # batches of 4, 4 and 3 (the one-byte record is skipped)
    got = evaluate.verbatim(ens, recs, n=12, new_tokens=8)
    assert got == {"rouge_l": 0.5, "rouge_l_recall": pytest.approx(0.25 * 5 / 11), "records": 11}
    assert seen == alone


def test_truth_ratios_equal_scoring_each_answer_after_its_question():
    """TOFU truth ratios against an independent computation: each answer scored alone after its question."""
    from sisaflow.evaluation import tofu

    ens = _ensemble(2)
    with torch.no_grad():
        for p in ens.runner.parameters():
            if p.dim() >= 3:
                p.mul_(20.0)
    tpl = "Question: {question}\nAnswer: {answer}"
    perturbed = [
        {
            "question": f"who wrote book {i}?",
            "answer": f"author {i} did",
            "paraphrased_answer": f"it was written by author {i}" + "!" * i,
            "perturbed_answer": [f"nobody {j}" * (j + 1) for j in range(3 + i % 2)],
        }
        for i in range(7)
    ]
    texts = [tpl.format(question=e["question"], answer=e["answer"]) for e in perturbed] + ["unrelated text"]
    recs = _records(texts)

    def alone(prefix: str, answer: str) -> float:
        head, tail = ens.tokenizer.encode(prefix), ens.tokenizer.encode(answer)
        x = torch.tensor([head + tail])
        lp = ens(x).logits[0, :-1].gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
        return float(lp[-len(tail) :].mean())

    expected = sorted(
        metrics.truth_ratio(
            alone(f"Question: {e['question']}\nAnswer: ", e["paraphrased_answer"]),
            [alone(f"Question: {e['question']}\nAnswer: ", a) for a in e["perturbed_answer"]],
        )
        for e in perturbed
    )
    got = tofu.truth_ratios(ens, perturbed, recs, tpl)
    assert len(got) == 7 and len(set(got)) == 7
    for g, e in zip(got, expected, strict=True):
        assert math.isclose(g, e, rel_tol=1e-5)
