"""Classification with the served ensemble: a classification corpus is a generative one whose text ends with
the class (`corpus.label_field`, `corpus.labels`, a text template ending with the class), so each constituent
trains as any other, and exact unlearning, checkpoints and certificates are unchanged.

A constituent's class distribution is its likelihood of each class (with the end-of-text that follows it in
training) after the text before the class, normalised over the classes. The ensemble combines them as DESIGN.md
says: `mean` of the constituents' class probabilities (weighted as the mixture is), or a `vote` of their most
likely classes (ties go to the higher mean). Every (text, class) pair of a batch is one row of one batched
forward of all constituents (`Ensemble.runner`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sisaflow.core.config import CLASSIFY_RULES, CorpusParams
from sisaflow.core.errors import CorpusError, WorkspaceError
from sisaflow.data.corpus import Record, check_label, required_field, source_rows, template_fields
from sisaflow.inference.ensemble import Ensemble, length_batches


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    """The combined class distribution (the weighted mean of the constituents')."""
    votes: dict[str, float]
    """Per class, the weight of the constituents whose most likely class it is (sums to 1)."""


@dataclass(frozen=True)
class Input:
    record_id: str
    prompt: str = field(repr=False)
    """The text before the class (never written anywhere by sisaflow)."""
    gold: str | None
    """The class the file gives, if it gives one."""


def require_classes(cp: CorpusParams) -> list[str]:
    if not cp.label_field or not cp.labels:
        raise WorkspaceError(
            "this workspace's corpus has no classes: set corpus.label_field, corpus.labels and a text_template "
            "ending with the class field in params.yaml (or `sisaflow init --label-field F --labels A,B`)"
        )
    return list(cp.labels)


def read_inputs(path: Path, cp: CorpusParams) -> list[Input]:
    """The records of a file read like the corpus, as texts to classify; the class field may be absent (no gold
    class) but, when present, must name one of corpus.labels. CorpusError names the file and line."""
    require_classes(cp)
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: file not found")
    out: list[Input] = []
    for n, (where, row) in enumerate(source_rows(path, cp.format), 1):
        if isinstance(row, str):  # only the txt format yields bare lines, and classes need a template
            raise CorpusError(f"{where}: a classification corpus needs records with fields, not lines")
        record_id = required_field(row, cp.id_field, where) if cp.id_field else f"row-{n}"
        for name in template_fields(cp.prompt_template):
            required_field(row, name, where)
        labelled = row.get(cp.label_field or "") not in (None, "")
        gold = check_label(row, cp, where) if labelled else None
        out.append(Input(record_id, cp.prompt_template.format(**row), gold))
    if not out:
        raise CorpusError(f"{path}: holds no records")
    return out


def split_text(text: str, cp: CorpusParams) -> tuple[str, str] | None:
    """(text before the class, class) of a training text, or None if it does not end with a class after the
    template's last literal part (the longest class wins: 'not spam' over 'spam')."""
    tail = cp.prompt_template.rsplit("}", 1)[-1]  # what the template puts right before the class
    for label in sorted(require_classes(cp), key=len, reverse=True):
        if text.endswith(tail + label):
            return text[: len(text) - len(label)], label
    return None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def class_log_likelihoods(
    ens: Ensemble, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 16
) -> torch.Tensor:
    """(S, N, C) float64: each constituent's log-likelihood of each class after each prompt.

    The class is tokenized as training saw it, inside the whole text (prompt + class + end-of-text): byte-pair
    tokens may straddle the boundary, so each (prompt, class) row scores its tokens from the first one where
    any class's text departs from the prompt's own tokens, and the rows of one prompt share everything before."""
    tok, eos = ens.tokenizer, ens.tokenizer.eos_id
    rows: list[tuple[list[int], int]] = []  # (token ids, first scored position)
    for prompt in prompts:
        head = tok.encode(prompt)
        fulls = [tok.encode(prompt + c) + [eos] for c in labels]
        start = min(_common_prefix(head, f) for f in fulls)
        for ids in fulls:
            first = start
            if first == 0:  # nothing shared to condition on: start from an end-of-text, as after a record
                ids, first = [eos, *ids], 1
            cut = max(0, len(ids) - ens.context_length)  # too long: keep the end, as generate does
            rows.append((ids[cut:], max(1, first - cut)))
    out = torch.empty(ens.runner.num_models, len(rows), dtype=torch.float64)
    device = ens.weights.device
    with torch.no_grad():
        for chunk, x in length_batches([ids for ids, _ in rows], batch_size, eos):
            logits, _ = ens.runner(x.to(device))  # (S, B, T, V)
            for r, i in enumerate(chunk):
                ids, first = rows[i]
                lp = torch.log_softmax(logits[:, r, first - 1 : len(ids) - 1].double(), dim=-1)
                target = x[r, first : len(ids)].to(lp.device)
                picked = lp.gather(-1, target.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(-1)
                out[:, i] = picked.sum(-1).cpu()
    return out.view(-1, len(prompts), len(labels))


def classify(
    ens: Ensemble, prompts: Sequence[str], labels: Sequence[str], rule: str = "mean", batch_size: int = 16
) -> list[Prediction]:
    """One prediction per prompt: `mean` (the class of highest mean probability) or `vote`."""
    if rule not in CLASSIFY_RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(CLASSIFY_RULES)}")
    ens.check_current()
    if not prompts:
        return []
    q = torch.softmax(class_log_likelihoods(ens, prompts, labels, batch_size), dim=-1)  # (S, N, C)
    w = ens.weights.detach().cpu().double()
    mean = (w.view(-1, 1, 1) * q).sum(0)  # (N, C)
    votes = torch.zeros_like(mean)
    votes.scatter_add_(1, q.argmax(-1).T, w.expand(len(prompts), -1))
    preds = []
    for n in range(len(prompts)):
        if rule == "mean":
            best = int(mean[n].argmax())
        else:
            best = max(range(len(labels)), key=lambda c: (float(votes[n, c]), float(mean[n, c])))
        preds.append(
            Prediction(
                labels[best],
                {c: float(mean[n, k]) for k, c in enumerate(labels)},
                {c: float(votes[n, k]) for k, c in enumerate(labels)},
            )
        )
    return preds


def accuracy(ens: Ensemble, records: Sequence[Record], cp: CorpusParams, rule: str) -> dict | None:
    """The ensemble's accuracy on training-form records (text + class); None when none ends with a class."""
    split = [p for p in (split_text(r.text, cp) for r in records) if p is not None]
    if not split:
        return None
    preds = classify(ens, [prompt for prompt, _ in split], require_classes(cp), rule)
    right = sum(p.label == gold for p, (_, gold) in zip(preds, split, strict=True))
    return {"accuracy": right / len(split), "records": len(split)}
