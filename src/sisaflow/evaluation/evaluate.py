"""`sisaflow evaluate`: utility and forgetting, measured the way the unlearning field measures them.

Three groups of records: retained (in the current corpus), never-seen (params' evaluate.holdout, e.g. TOFU's
holdout authors) and forgotten (the records of certified deletion requests, read from the corpus source in
memory: their text is never written anywhere). Every record is scored once by every constituent; the
ensemble's scores are the constituents' log-probabilities combined as served.

- Utility: perplexity of the ensemble, of each constituent and of a monolithic baseline (one model on all
  current data with the same total compute, trained in a temporary directory and removed).
- Forgetting: membership attacks (LOSS, zlib, Min-K%, Min-K%++) as AUC with 95% bootstrap intervals, forgotten
  vs never-seen (should sit near 0.5) and, as the control that shows the attacks have power, retained vs
  never-seen (for the ensemble and for each constituent on its own shard's records); verbatim memorisation
  (ROUGE-L F1 and recall, rouge-score as TOFU runs it, of the greedy continuation of a record's first half); on
  TOFU, truth ratio and forget quality.
- Before/after: a forget run snapshots the to-be-forgotten records' aggregates before retraining
  (`snapshot_before`, reports/before/); evaluate puts them beside the same aggregates now. Aggregates only.

In SISA the retrained constituents are the "retain model" reference that other unlearning methods lack: the
served ensemble after a deletion is bitwise the model trained without the records (`verify --exact`), so its
forget quality against that reference is 1 by construction; the numbers worth reading are the ones before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sisaflow.core import ledger
from sisaflow.core.config import Params
from sisaflow.core.errors import WorkspaceError
from sisaflow.core.fsio import write_json
from sisaflow.core.hashing import workspace_hasher
from sisaflow.core.memory import release_freed_memory
from sisaflow.core.paths import Workspace
from sisaflow.core.progress import Meter, meter
from sisaflow.data.corpus import Record, content_hash, from_table, read_records, read_table
from sisaflow.data.sharding import shard_of as owner_shard
from sisaflow.evaluation import metrics
from sisaflow.evaluation.baseline import train_baseline
from sisaflow.evaluation.tofu import load_perturbed, tofu_metrics, truth_ratios
from sisaflow.inference.combine import (
    combine_log_probs,
    posterior_log_weights,
    running_scores,
    token_log_probs,
)
from sisaflow.inference.ensemble import Ensemble, length_batches
from sisaflow.inference.routing import posterior_step

log = logging.getLogger("sisaflow.evaluation.evaluate")
Progress = Callable[[str], None]
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


@dataclass
class Scored:
    """One record's scores: token statistics under the ensemble and under each constituent."""

    shard: int
    """The shard whose constituent trained on it (-1: none); keyed by record id in `score_records`."""
    tokens: int
    ensemble: metrics.TokenStats
    constituents: list[metrics.TokenStats]
    zlib_text: str = field(repr=False, default="")
    route: list[float] | None = None
    """ensemble.combine posterior: each served constituent's weight after the whole record (where the ensemble
    would route what follows it); None for other combinations."""


def sample(records: Sequence[Record], n: int) -> list[Record]:
    """At most `n` records, spread evenly over the plain content-hash order (deterministic, the same whatever the
    workspace's hash key)."""
    ordered = sorted(records, key=lambda r: content_hash(r.record_id, r.text))
    if len(ordered) <= n:
        return ordered
    step = len(ordered) / n
    return [ordered[int(i * step)] for i in range(n)]


SCORE_BYTES = 1 << 30
"""`score_records` keeps a batch's float64 log-probabilities (constituents x rows x positions x vocabulary)
within this many bytes (their combination and the float32 logits come on top, about as much again)."""


def score_records(
    ens: Ensemble,
    records: Sequence[Record],
    shard_of: dict[str, int],
    batch_size: int = 16,
    scored_meter: Meter | None = None,
) -> list[Scored]:
    """Score every record with every constituent: one batched forward per `batch_size` records of similar
    length, right-padded (causal attention: a position never sees the padding after it). `scored_meter`
    advances by every record of `records`, scored or too short to score."""
    tok = ens.tokenizer
    encoded = [(r, (tok.encode(r.text) + [tok.eos_id])[: ens.context_length]) for r in records]
    encoded = [(r, ids) for r, ids in encoded if len(ids) >= 2]
    if scored_meter is not None:
        scored_meter.advance(len(records) - len(encoded))
    if encoded:  # every constituent's float64 distributions at every position of a batch: within SCORE_BYTES
        per_row = 8 * ens.runner.num_models * max(len(ids) for _, ids in encoded) * tok.vocab_size
        batch_size = max(1, min(batch_size, SCORE_BYTES // per_row))
    scored: dict[int, Scored] = {}
    for chunk, x in length_batches([ids for _, ids in encoded], batch_size, tok.eos_id):
        with torch.no_grad():
            logits, _ = ens.runner(x.to(ens.weights.device))
        lp = torch.log_softmax(logits.double(), dim=-1).cpu()  # (S, B, T, V)
        routes = None
        if ens.combine == "posterior":  # right padding: a position never sees the padding after it
            combined, _ = posterior_step(lp, x, None, ens.weights.cpu(), ens.posterior, None, None, False)
            scores = running_scores(token_log_probs(lp, x), None)  # (S, B, T-1)
            routes = posterior_log_weights(ens.weights.cpu(), scores, ens.posterior).exp()
        else:
            combined = combine_log_probs(lp, ens.weights.cpu(), ens.combine)  # (B, T, V)
        for row, i in enumerate(chunk):
            r, ids = encoded[i]
            n = len(ids) - 1
            target = x[row, 1 : n + 1]
            per = [metrics.token_stats(lp[s, row, :n], target) for s in range(lp.shape[0])]
            scored[i] = Scored(
                shard_of.get(r.record_id, -1),
                n,
                metrics.token_stats(combined[row, :n], target),
                per,
                r.text,
                None if routes is None else routes[:, row, n - 1].tolist(),
            )
        del logits, lp, combined, routes
        release_freed_memory()  # else glibc's heap keeps every batch's tensors: sisaflow.core.memory
        if scored_meter is not None:
            scored_meter.advance(len(chunk))
    return [scored[i] for i in range(len(encoded))]


def perplexity(scored: Sequence[Scored], which: int | None = None) -> float | None:
    """Corpus-level perplexity (per token) under the ensemble (which=None) or constituent `which`."""
    if not scored:
        return None
    ll = tokens = 0.0
    for s in scored:
        st = s.ensemble if which is None else s.constituents[which]
        ll += float(st.token_log_probs.sum())
        tokens += len(st.token_log_probs)
    return math.exp(-ll / tokens)


def attack_scores(scored: Sequence[Scored], k: float, which: int | None = None) -> dict[str, list[float]]:
    """Per-attack membership scores (higher: more likely a member)."""
    out: dict[str, list[float]] = {a: [] for a in ATTACKS}
    for s in scored:
        st = s.ensemble if which is None else s.constituents[which]
        out["loss"].append(metrics.loss_score(st))
        out["zlib"].append(metrics.zlib_score(st, s.zlib_text))
        out["min_k"].append(metrics.min_k_score(st, k))
        out["min_k_plus_plus"].append(metrics.min_k_plus_plus_score(st, k))
    return out


def attacks(
    members: Sequence[Scored], nonmembers: Sequence[Scored], ep, which: int | None = None
) -> dict[str, dict] | None:
    """AUC with a 95% bootstrap interval for each attack, members vs non-members; None when a group is empty."""
    if not members or not nonmembers:
        return None
    a, b = attack_scores(members, ep.min_k, which), attack_scores(nonmembers, ep.min_k, which)
    out = {}
    for name in ATTACKS:
        auc, low, high = metrics.auc_with_ci(a[name], b[name], n_boot=ep.bootstrap, seed=ep.seed)
        out[name] = {
            "auc": auc,
            "low": low,
            "high": high,
            "members": len(a[name]),
            "nonmembers": len(b[name]),
        }
    return out


GENERATE_BATCH = 16
"""Records per batched generation in `verbatim` (each gets what it gets alone: Ensemble.generate)."""


def verbatim(
    ens: Ensemble,
    records: Sequence[Record],
    n: int,
    new_tokens: int,
    continued_meter: Meter | None = None,
) -> dict | None:
    """ROUGE-L F1 and recall (rouge-score, stemmed, as TOFU computes it: `metrics.rouge_l_scores`) of the greedy
    continuation of each record's first half against its true next `new_tokens` tokens; means and count over at
    most `n` records. `continued_meter` advances by each of those records, continued or too short to be."""
    tok = ens.tokenizer
    prompts, references = [], []
    chosen = list(records)[:n]
    for r in chosen:
        ids = tok.encode(r.text)
        half = len(ids) // 2
        if half < 1 or len(ids) - half < 1:
            continue
        prompts.append(tok.decode(ids[:half]))
        references.append(tok.decode(ids[half : half + new_tokens]))
    if continued_meter is not None:
        continued_meter.advance(len(chosen) - len(prompts))
    continuations: list[str] = []
    for i in range(0, len(prompts), GENERATE_BATCH):  # one batched generation per GENERATE_BATCH records
        batch = prompts[i : i + GENERATE_BATCH]
        continuations += ens.generate(batch, max_new_tokens=new_tokens)
        release_freed_memory()
        if continued_meter is not None:
            continued_meter.advance(len(batch))
    scores = [metrics.rouge_l_scores(ref, cont) for ref, cont in zip(references, continuations, strict=True)]
    if not scores:
        return None
    return {
        "rouge_l": float(np.mean([s.f1 for s in scores])),
        "rouge_l_recall": float(np.mean([s.recall for s in scores])),
        "records": len(scores),
    }


# ---- the groups ----


def forgotten_records(
    ws: Workspace, params: Params, request_ids: set[str] | None = None, source: list[Record] | None = None
) -> list[Record]:
    """The records of `request_ids` (default: every certified request), from the corpus source (`source`:
    its records already read)."""
    state = ledger.current_state(ws.ledger_file)
    wanted: set[str] = set()
    for req in ledger.read_ledger(ws.ledger_file):
        if (request_ids is None and state.get(req.request_id) == "certified") or (
            request_ids is not None and req.request_id in request_ids
        ):
            wanted.update(req.content_hashes)
    if not wanted:
        return []
    if source is None:
        source = read_records(
            ws.source(params.corpus.path), params.corpus, workspace_hasher(ws, params.corpus)
        )
    return [r for r in source if r.content_hash in wanted]


def holdout_records(ws: Workspace, params: Params) -> list[Record]:
    """The never-seen records (evaluate.holdout), read with the corpus' fields; [] when none is set."""
    if not params.evaluate.holdout:
        return []
    path = ws.source(params.evaluate.holdout)
    corpus = dataclasses.replace(params.corpus, path=str(path))
    return read_records(path, corpus, workspace_hasher(ws, params.corpus))  # hashed as the corpus is


def _placement(ws: Workspace) -> dict[str, int]:
    t = read_table(ws.placement_file).select(["record_id", "shard"]).to_pydict()
    return dict(zip(t["record_id"], t["shard"]))


def _current(ws: Workspace) -> list[Record]:
    return from_table(read_table(ws.corpus_file)) if ws.corpus_file.is_file() else []


# ---- before a deletion ----


def forgotten_aggregates(
    ens: Ensemble, params: Params, forgotten: list[Record], never: list[Scored], perturbed: list[dict]
) -> dict:
    """The aggregates of the forgotten group that are compared before and after (no text, no ids)."""
    ep = params.evaluate
    scored = score_records(ens, forgotten, {})
    out: dict = {
        "records": len(scored),
        "perplexity": perplexity(scored),
        "attacks_vs_never_seen": attacks(scored, never, ep),
        "verbatim": verbatim(ens, forgotten, ep.rouge_records, ep.rouge_new_tokens),
    }
    # score_records leaves out a record with no token to score; `former` follows it
    tok = ens.tokenizer
    former = [owner_shard(r.owner, params.sharding.shards) for r in forgotten if tok.encode(r.text)]
    routing = routing_vs_never_seen(ens, scored, former, never, ep)
    if routing is not None:
        out["routing_vs_never_seen"] = routing
    if perturbed:
        out["truth_ratios"] = truth_ratios(ens, perturbed, forgotten, params.corpus.text_template)
    return out


def routing_vs_never_seen(
    ens: Ensemble, forgotten: Sequence[Scored], former: Sequence[int], never: Sequence[Scored], ep
) -> dict | None:
    """Whether the posterior's routing still singles out a forgotten owner's former shard: the weight that shard
    gets after each forgotten record against the weight it gets after each never-seen record, as an AUC with a
    95% bootstrap interval (0.5: no more than for anyone). None unless combine is posterior and both groups
    have records. `former`: each forgotten record's shard, in `forgotten`'s order."""
    if not forgotten or not never or forgotten[0].route is None:
        return None
    index = {shard: i for i, shard in enumerate(ens.shards)}

    def weight(s: Scored, shard: int) -> float:
        return s.route[index[shard]] if shard in index and s.route else 0.0  # excluded: routed nowhere

    mine = [weight(s, shard) for s, shard in zip(forgotten, former, strict=True)]
    theirs = [weight(s, shard) for shard in sorted(set(former)) for s in never]
    auc, low, high = metrics.auc_with_ci(mine, theirs, n_boot=ep.bootstrap, seed=ep.seed)
    return {
        "auc": auc,
        "low": low,
        "high": high,
        "mean_weight_forgotten": float(np.mean(mine)),
        "mean_weight_never_seen": float(np.mean(theirs)),
        "members": len(mine),
        "nonmembers": len(theirs),
    }


def snapshot_before(ws: Workspace, params: Params, request_ids: list[str], run_id: str) -> Path | None:
    """Before a forget run retrains: the to-be-forgotten records' aggregates under the ensemble that was
    trained on them (every registered constituent, excluded or not). Written to reports/before/."""
    if not params.evaluate.before_after or not request_ids or not ws.registry_file.is_file():
        return None
    forgotten = sample(forgotten_records(ws, params, set(request_ids)), params.evaluate.max_records)
    if not forgotten:
        return None
    ens = Ensemble.load(ws, respect_requests=False)
    never = score_records(ens, sample(holdout_records(ws, params), params.evaluate.max_records), {})
    perturbed = (
        load_perturbed(ws.source(params.evaluate.tofu_perturbed)) if params.evaluate.tofu_perturbed else []
    )
    agg = forgotten_aggregates(ens, params, forgotten, never, perturbed)
    path = ws.root / "reports" / "before" / f"{run_id}.json"
    write_json(
        path, {"run_id": run_id, "requests": sorted(request_ids), "ensemble_version": ens.version, **agg}
    )
    return path


# ---- evaluate ----


def evaluate(
    ws: Workspace, params: Params, baseline: bool | None = None, progress: Progress | None = None
) -> dict:
    """Every metric of the module docstring, as one JSON-ready dict (numbers, counts and request ids only)."""
    say = progress or log.info
    ep = params.evaluate
    ens = Ensemble.load(ws)
    shard_of = _placement(ws)
    current = _current(ws)
    holdout = holdout_records(ws, params)
    retained = sample(current, ep.max_records)
    never_recs = sample(holdout, ep.max_records)
    overlap = {r.content_hash for r in holdout} & {r.content_hash for r in current}
    if overlap:
        raise WorkspaceError(
            f"{ep.holdout}: {len(overlap)} never-seen record(s) are also in the training corpus; the holdout must "
            "hold records the models never saw"
        )
    # the corpus source, read once for every forgotten group (in memory only)
    source = (
        read_records(ws.source(params.corpus.path), params.corpus, workspace_hasher(ws, params.corpus))
        if ledger.read_ledger(ws.ledger_file)
        else []
    )
    forgotten_recs = sample(forgotten_records(ws, params, source=source), ep.max_records)
    perturbed = load_perturbed(ws.source(ep.tofu_perturbed)) if ep.tofu_perturbed else []
    say(
        f"scoring {len(retained)} retained, {len(never_recs)} never-seen and {len(forgotten_recs)} forgotten "
        f"records with {len(ens.shards)} constituent(s)"
    )
    with meter(
        "evaluate: scoring", len(retained) + len(never_recs) + len(forgotten_recs), "record"
    ) as scoring:
        kept = score_records(ens, retained, shard_of, scored_meter=scoring)
        never = score_records(ens, never_recs, {}, scored_meter=scoring)
        gone = score_records(ens, forgotten_recs, {}, scored_meter=scoring)
    groups = {"forgotten": forgotten_recs, "retained": retained, "never_seen": never_recs}
    n_continued = sum(min(len(g), ep.rouge_records) for g in groups.values())
    with meter("evaluate: generating", n_continued, "record") as continuing:
        verbatims = {
            name: verbatim(ens, group, ep.rouge_records, ep.rouge_new_tokens, continuing)
            for name, group in groups.items()
        }

    constituents = []
    # a merged ensemble (ensemble.combine: merge) is one model: it has no constituent of its own to score
    per_shard = ens.shards if ens.runner.num_models == len(ens.shards) else []
    for i, shard in enumerate(per_shard):
        own = [s for s in kept if s.shard == shard]
        constituents.append(
            {
                "shard": shard,
                "perplexity": {
                    "own_shard": perplexity(own, i),
                    "other_shards": perplexity([s for s in kept if s.shard != shard], i),
                    "never_seen": perplexity(never, i),
                },
                "attacks_own_vs_never_seen": attacks(own, never, ep, i),
            }
        )
    out: dict = {
        "ensemble_version": ens.version,
        "constituents_served": len(ens.shards),
        "groups": {"retained": len(kept), "never_seen": len(never), "forgotten": len(gone)},
        "utility": {
            "ensemble": {"retained": perplexity(kept), "never_seen": perplexity(never)},
            "constituents": constituents,
        },
        "forgetting": {
            "attacks_forgotten_vs_never_seen": attacks(gone, never, ep),
            "attacks_retained_vs_never_seen": attacks(kept, never, ep),
            "verbatim": verbatims,
        },
        "notes": [],
    }
    if not never_recs:
        out["notes"].append("no evaluate.holdout: membership attacks and never-seen perplexity are left out")
    if not forgotten_recs:
        out["notes"].append("no certified deletion request yet: nothing forgotten to measure")
    if perturbed:
        out["tofu"] = tofu_metrics(ens, params, perturbed, forgotten_recs, retained)
    if params.corpus.label_field:
        from sisaflow.inference.classify import accuracy

        rule = params.ensemble.classify
        out["classification"] = {
            "rule": rule,
            **{
                name: accuracy(ens, recs, params.corpus, rule)
                for name, recs in (
                    ("retained", retained),
                    ("never_seen", never_recs),
                    ("forgotten", forgotten_recs),
                )
            },
        }
    out["before_after"] = _before_after(ws, params, ens, never, perturbed, source)
    if baseline if baseline is not None else ep.baseline:
        say("training the monolithic baseline (one model, all current data, same total compute)")
        mono, seconds = train_baseline(ws, params, say)
        m_kept = score_records(mono, retained, {})
        m_never = score_records(mono, never_recs, {})
        out["utility"]["baseline"] = {
            "retained": perplexity(m_kept),
            "never_seen": perplexity(m_never),
            "train_seconds": seconds,
        }
    return out


def _before_after(
    ws: Workspace,
    params: Params,
    ens: Ensemble,
    never: list[Scored],
    perturbed: list[dict],
    source: list[Record],
) -> list[dict]:
    """For the latest snapshots taken before a deletion: those aggregates beside the same ones now."""
    ep = params.evaluate
    state = ledger.current_state(ws.ledger_file)
    out = []
    for path in sorted((ws.root / "reports" / "before").glob("*.json"), reverse=True)[:5]:
        before = json.loads(path.read_text())
        if not all(state.get(r) == "certified" for r in before["requests"]):
            continue
        forgotten = sample(forgotten_records(ws, params, set(before["requests"]), source), ep.max_records)
        after = forgotten_aggregates(ens, params, forgotten, never, perturbed)
        entry = {"run_id": before["run_id"], "requests": before["requests"], "before": before, "after": after}
        tb, ta = before.get("truth_ratios") or [], after.get("truth_ratios") or []
        if tb and ta:
            # TOFU's forget quality of the model before the deletion, against the retrained reference (now)
            entry["forget_quality_before"] = metrics.forget_quality(tb, ta)
            entry["forget_quality_after"] = metrics.forget_quality(ta, ta)
        ab = (before.get("attacks_vs_never_seen") or {}).get("min_k", {}).get("auc")
        aa = (after.get("attacks_vs_never_seen") or {}).get("min_k", {}).get("auc")
        if ab is not None and aa:
            # MUSE's PrivLeak with the retrained model as reference; after the deletion the served model is it
            entry["priv_leak_before"] = metrics.priv_leak(ab, aa)
            entry["priv_leak_after"] = metrics.priv_leak(aa, aa)
        out.append(entry)
    return out
