"""TOFU's measures of forgetting: truth ratios of paraphrased vs perturbed answers (from a *_perturbed.json file)
and forget quality (the KS test of the forgotten questions' truth ratios against the retrained model's)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sisaflow.core.config import Params
from sisaflow.core.errors import WorkspaceError
from sisaflow.data.corpus import Record
from sisaflow.evaluation import metrics
from sisaflow.inference.ensemble import Ensemble


def _answer_ll(ens: Ensemble, prefix: str, answer: str) -> float:
    """Mean log-likelihood per token of `answer` after `prefix` under the ensemble."""
    tok = ens.tokenizer
    head, tail = tok.encode(prefix), tok.encode(answer)
    ids = (head + tail)[-ens.context_length :]
    n = min(len(tail), len(ids) - 1)
    if n < 1:
        return float("nan")
    x = torch.tensor([ids], device=ens.weights.device)
    with torch.no_grad():
        lp = ens(x).logits[0, :-1]
    token_lp = lp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)[-n:]
    return float(token_lp.mean())


def truth_ratios(
    ens: Ensemble, perturbed: list[dict], records: Sequence[Record], template: str | None
) -> list[float]:
    """TOFU truth ratios for the records whose question the perturbed file has (numbers only, unordered)."""
    if not template or "{answer}" not in template or "{question}" not in template:
        return []
    by_question = {e["question"]: e for e in perturbed}
    prefix_tpl = template.split("{answer}")[0]
    out = []
    for r in records:
        for q, e in by_question.items():
            if prefix_tpl.format(question=q) in r.text and e["answer"] in r.text:
                prefix = prefix_tpl.format(question=q)
                para = _answer_ll(ens, prefix, e["paraphrased_answer"])
                pert = [_answer_ll(ens, prefix, a) for a in e["perturbed_answer"]]
                out.append(metrics.truth_ratio(para, pert))
                break
    return sorted(out)


def load_perturbed(path: Path) -> list[dict]:
    """A TOFU *_perturbed.json file (a JSON list, or JSON lines) of question/answer/paraphrased/perturbed."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    for i, row in enumerate(rows, 1):
        missing = {"question", "answer", "paraphrased_answer", "perturbed_answer"} - set(row)
        if missing:
            raise WorkspaceError(f"{path}: entry {i} lacks {', '.join(sorted(missing))}")
    return rows


def tofu_metrics(
    ens: Ensemble, params: Params, perturbed: list[dict], forgotten: list[Record], retained: list[Record]
) -> dict:
    """Truth ratios on the forgotten and retained questions the perturbed file has; forget quality."""
    tpl = params.corpus.text_template
    gone = truth_ratios(ens, perturbed, forgotten, tpl)
    kept = truth_ratios(ens, perturbed, retained, tpl)
    out = {
        "truth_ratio_forgotten": summary(gone),
        "truth_ratio_retained": summary(kept),
        # the reference of TOFU's forget quality is the model retrained without the forget set: in SISA
        # that is the served ensemble itself (bitwise, `verify --exact`), so the KS test compares it with itself
        "forget_quality": metrics.forget_quality(gone, gone) if gone else None,
    }
    return out


def summary(values: Sequence[float]) -> dict | None:
    """Count, mean and median of `values`; None when there are none."""
    if not values:
        return None
    v = np.asarray(values, dtype=float)
    return {"n": len(v), "mean": float(v.mean()), "median": float(np.median(v))}
