"""LoRA over a pretrained base: the sisaflow ensemble against an ordinary fine-tune, and what a forget costs, all
measured in one run (issue 15).

    python bench/lora_quality.py --base bases/smollm2-135m-instruct --out bench/results/lora   # make bench-lora
    python bench/lora_quality.py --smoke --out DIR        # a tiny random base on CPU (a unit test runs it)
    python bench/lora_quality.py --sweep-lr 3e-4,1e-3,3e-3 --base ... --out DIR   # how the default lr was chosen

Every layout trains the same LoRA adapters (same base, settings, epochs over the same records: the same total
compute) on a TOFU subset, with the library's own code and no Ray, Prefect or DVC (train_shard in this process,
one shard after another; bench/lora_gpu.py runs the same on a GPU):
- the monolithic fine-tune: one adapter on all records (S=1, R=1), what a user would do without sisaflow;
- the sisaflow ensemble at each S (R slices), served three ways: the per-token mixture of the constituents'
  probabilities, their product (mean of log-probabilities, renormalised), and one merged model (the base plus the
  mean of the adapters' weight deltas);
- the base alone (zero-shot).
Measured: perplexity on retained records and on never-seen records (TOFU's holdout authors) with 95% bootstrap
intervals over records; ROUGE-L recall of greedy answers to retained questions against the reference answers
(rouge-score, stemmed, as TOFU computes it); tokens and seconds of each full training and of one owner's forget,
and the expected forget cost over all owners (exact, from the run's per-slice work and the placement) next to
the cost model (1/S)(R+1)/(2R). The JSON is rewritten after every measurement, so a timeout keeps what was done.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO), str(REPO / "bench")]

import cost_accounting as ca  # noqa: E402
import forget_grid as fg  # noqa: E402

from sisaflow.core.config import LoraParams, ModelParams, Params, PosteriorParams, TrainParams  # noqa: E402
from sisaflow.core.memory import release_freed_memory  # noqa: E402
from sisaflow.data.corpus import Record, content_hash  # noqa: E402
from sisaflow.data.sharding import shard_corpus, shard_of  # noqa: E402
from sisaflow.evaluation.metrics import truth_ratio  # noqa: E402
from sisaflow.evaluation.tofu import load_perturbed  # noqa: E402
from sisaflow.inference.combine import posterior_log_weights, running_scores  # noqa: E402
from sisaflow.inference.ensemble import Ensemble, length_batches  # noqa: E402
from sisaflow.inference.registry import build_registry  # noqa: E402
from sisaflow.models.pretrained import load_base_model  # noqa: E402
from sisaflow.models.tokenizer import load_tokenizer  # noqa: E402

TOFU = REPO / "data" / "tofu"
TEMPLATE = "Question: {question}\nAnswer: {answer}"
COMBINES = ("mixture", "posterior", "posterior-floor", "top-2", "top-1", "product", "merge")
"""The rules every layout is served with; `posterior-floor` takes the beta and floor that `choose_posterior`
picks on held-out records (the other posterior rules: beta 1)."""
GRID_BETAS = (0.25, 0.5, 1.0)
GRID_FLOORS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)
HELD_OUT = 2
"""Of each author's 20 records, the last HELD_OUT are trained on by no layout: same-author held-out questions,
on which (with never-seen authors) the posterior's beta and floor are chosen."""


def rule(name: str, chosen: PosteriorParams | None = None) -> tuple[str, PosteriorParams]:
    """The ensemble's combine and posterior settings of a rule name (`COMBINES`, or `posterior:BETA:FLOOR`)."""
    if name.startswith("posterior:"):
        _, beta, floor = name.split(":")
        return "posterior", PosteriorParams(beta=float(beta), floor=float(floor))
    if name == "posterior":
        return "posterior", PosteriorParams()
    if name == "posterior-floor":
        return "posterior", chosen or PosteriorParams()
    if name.startswith("top-"):
        return "posterior", PosteriorParams(top_k=int(name[4:]))
    return ("mixture" if name == "merge" else name), PosteriorParams()


SCORED_GROUPS = ("retained", "never_seen", "validation")
PERTURBED = ("forget10_perturbed.json",)
"""TOFU's paraphrased and perturbed answers for authors 180-199 (data/tofu): the truth ratio of every
retained question they cover."""


def grid_rules() -> list[str]:
    return [f"posterior:{b}:{f}" for b in GRID_BETAS for f in GRID_FLOORS]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures."""

    base: str
    authors: int
    """The last `authors` TOFU authors (TOFU's forget sets are the last ones)."""
    shards: tuple[int, ...]
    slices: int
    epochs: int
    learning_rate: float
    eval_records: int
    questions: int
    new_tokens: int
    device: str
    threads: int
    bootstrap: int = 1000
    seed: int = 0
    forget: bool = True
    match_steps: bool = False
    """Also train each S >= 2 with batch size batch // S (at least 1), side by side with the plain layout: each
    constituent gets the monolithic's optimizer steps on 1/S of the records, at the same compute (tokens),
    instead of 1/S of its steps."""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subset(plan: Plan, root: Path) -> tuple[Path, list[dict], list[dict]]:
    """The corpus subset as JSONL (the last `authors` authors), its rows, and the never-seen holdout rows."""
    rows = read_jsonl(TOFU / "records.jsonl")
    authors = sorted({r["author_id"] for r in rows})[-plan.authors :]
    chosen = [r for r in rows if r["author_id"] in set(authors) and not held_out(r)]
    source = root / "subset.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return source, chosen, read_jsonl(TOFU / "holdout_records.jsonl")


def held_out(row: dict) -> bool:
    """Whether a record is one of its author's HELD_OUT last (TOFU ids run 0..19 per author)."""
    return int(row["id"].rsplit("-", 1)[-1]) % 20 >= 20 - HELD_OUT


def validation(plan: Plan) -> list[Record]:
    """The subset's authors' held-out records: no layout trains on them."""
    rows = read_jsonl(TOFU / "records.jsonl")
    authors = set(sorted({r["author_id"] for r in rows})[-plan.authors :])
    return [as_record(r) for r in rows if r["author_id"] in authors and held_out(r)]


def as_record(row: dict) -> Record:
    text = TEMPLATE.format(**row)
    rid = str(row["id"])
    return Record(rid, str(row["author_id"]), text, content_hash(rid, text))


def params_for(plan: Plan, lr: float | None = None) -> Params:
    """The settings `sisaflow init --base` writes (sisaflow.pipeline.create.LORA_*), over `plan.base`; the context is 256
    tokens (TOFU's longest record is 137 with SmolLM2's tokenizer, so nothing is cut; the tiny base allows 256)."""
    from sisaflow.pipeline.create import LORA_MODEL, LORA_TRAIN

    base = Params()
    corpus = dataclasses.replace(base.corpus, path="subset.jsonl", text_template=TEMPLATE)
    lora = LoraParams(**LORA_MODEL["lora"])
    model = ModelParams(tokenizer="base", base=plan.base, context_length=256, lora=lora)
    train = TrainParams(
        **{**LORA_TRAIN, "learning_rate": lr or plan.learning_rate, "epochs_per_slice": plan.epochs},
        threads=plan.threads,
        device=plan.device,  # type: ignore[arg-type]
        log_every=1000,
    )
    return dataclasses.replace(base, corpus=corpus, model=model, train=train)


@dataclasses.dataclass
class Scores:
    """One forward of every constituent over a group of records, kept per record: each constituent's
    log-probability of each token after the first (S, n), and the product of experts' (n,), which needs the
    whole vocabulary. Every rule of `COMBINES` and of the posterior grid is a function of these."""

    per: list[torch.Tensor]
    product: list[torch.Tensor]


def record_rows(ens: Ensemble, records: list[Record]) -> list[list[int]]:
    """Each record's tokens and its end-of-text, cut to the context."""
    tok = ens.tokenizer
    return [(tok.encode(r.text) + [tok.eos_id])[: ens.context_length] for r in records]


def constituent_scores(ens: Ensemble, records: list[Record]) -> Scores:
    """`Scores` of `records` (their tokens and end-of-text)."""
    return row_scores(ens, record_rows(ens, records))


@torch.no_grad()
def row_scores(ens: Ensemble, rows: list[list[int]]) -> Scores:
    """`Scores` of token rows: one forward of all constituents per batch of 4; the product runs constituent by
    constituent in float64, so memory holds one (B, T, vocab) sum, not S of them."""
    tok = ens.tokenizer
    per_record: list = [None] * len(rows)
    product: list = [None] * len(rows)
    w = ens.weights.to(ens.weights.device)
    for chunk, x in length_batches(rows, 4, tok.eos_id):
        x = x.to(ens.weights.device)
        logits, _ = ens.runner(x)  # (S, B, T, V)
        target = x[:, 1:].unsqueeze(-1)
        per, total = [], None
        for s in range(logits.shape[0]):
            lp = torch.log_softmax(logits[s, :, :-1].double(), dim=-1)
            per.append(lp.gather(-1, target).squeeze(-1))  # (B, T-1)
            total = lp * w[s] if total is None else total + lp * w[s]
        per_t = torch.stack(per).cpu()  # (S, B, T-1)
        prod = torch.log_softmax(total, dim=-1).gather(-1, target).squeeze(-1).cpu()  # (B, T-1)
        for row, i in enumerate(chunk):
            n = len(rows[i]) - 1
            per_record[i], product[i] = per_t[:, row, :n].clone(), prod[row, :n].clone()
        del logits, per, per_t, total, prod
        release_freed_memory()  # sisaflow.core.memory: else glibc's heap keeps every batch's tensors
    return Scores(per_record, product)


def combined_log_probs(
    weights: torch.Tensor, per: torch.Tensor, product: torch.Tensor, kind: str, posterior: PosteriorParams
) -> torch.Tensor:
    """A rule's log-probability of each scored token (n,), from every constituent's (S, n) and the product's.
    The posterior weights each constituent with the library's weights (`posterior_log_weights`) over the
    running scores of the tokens before each position."""
    if kind == "posterior":
        before = running_scores(per[:, None], None)[:, 0] - per  # (S, n): the context each position has read
        return torch.logsumexp(per + posterior_log_weights(weights, before, posterior), dim=0)
    if kind == "mixture":  # a merge is one model: the "mixture" of one
        return torch.logsumexp(per + torch.log(weights)[:, None], dim=0)
    return product


def rule_scores(
    ens: Ensemble, scores: Scores, combines: tuple[str, ...], chosen: PosteriorParams | None = None
) -> dict[str, list]:
    """Per rule, per record: (log-likelihood of its tokens after the first, token count)."""
    w = ens.weights.cpu().double()
    out: dict[str, list] = {c: [] for c in combines}
    for per, product in zip(scores.per, scores.product, strict=True):
        for c in combines:
            combined = combined_log_probs(w, per, product, *rule(c, chosen))
            out[c].append((combined.sum().item(), per.shape[1]))
    return out


def token_log_probs(
    ens: Ensemble, records: list[Record], combines: tuple[str, ...], chosen: PosteriorParams | None = None
) -> dict[str, list]:
    """`rule_scores` of `records`, scored afresh."""
    return rule_scores(ens, constituent_scores(ens, records), combines, chosen)


def choose_posterior(ens: Ensemble, data: dict, plan: Plan, scored: dict[str, Scores]) -> dict:
    """The posterior's beta and floor with the highest log-likelihood on records no constituent trained on:
    the subset's authors' held-out questions and never-seen authors, weighted equally (a rule must both find an
    owner's constituent and not hurt a stranger). The whole grid is kept."""
    grid: dict = {}
    for group in ("validation", "never_seen"):
        scores = rule_scores(ens, scored[group], tuple(grid_rules()))
        for name, sc in scores.items():
            grid.setdefault(name, {})[group] = perplexity_ci(sc, plan.bootstrap, plan.seed)
    objective = {
        n: math.log(g["validation"]["ppl"]) + math.log(g["never_seen"]["ppl"]) for n, g in grid.items()
    }
    best = min(objective, key=objective.__getitem__)
    _, beta, floor = best.split(":")
    return {"beta": float(beta), "floor": float(floor), "grid": grid}


def perplexity_ci(scores: list, resamples: int, seed: int) -> dict:
    """Corpus perplexity exp(-sum ll / sum n) and its 95% bootstrap interval over records."""
    ll = torch.tensor([s[0] for s in scores], dtype=torch.float64)
    n = torch.tensor([s[1] for s in scores], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(scores), (resamples, len(scores)), generator=g)
    boot = torch.exp(-ll[idx].sum(1) / n[idx].sum(1))
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ppl": math.exp(-ll.sum().item() / n.sum().item()), "ci": [lo, hi], "records": len(scores)}


def prompt_of(question: dict) -> str:
    return f"Question: {question['question']}\nAnswer:"


def answers(ens: Ensemble, questions: list[dict], new_tokens: int) -> tuple[list[str], float]:
    """Greedy answers in batches of 8, and the generated tokens per second."""
    prompts = [prompt_of(q) for q in questions]
    out: list[str] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), 8):
        out += ens.generate(prompts[i : i + 8], max_new_tokens=new_tokens)
    seconds = time.perf_counter() - t0
    tokens = sum(len(ens.tokenizer.encode(a)) + 1 for a in out)  # + its end-of-text (or the cut)
    return [a.strip() for a in out], tokens / seconds


def routing_accuracy(ens: Ensemble, questions: list[dict], shards: int) -> float:
    """The share of questions whose highest-weighted constituent after the question is its author's."""
    hits = 0
    for q in questions:
        weights = ens.routing_weights(prompt_of(q))
        hits += ens.shards[weights.index(max(weights))] == shard_of(str(q["author_id"]), shards)
    return hits / len(questions)


def rouge_recall(refs: list[str], cands: list[str], resamples: int, seed: int) -> dict:
    """Mean ROUGE-L recall (rouge-score, stemmed: TOFU's) and its 95% bootstrap interval over questions."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    values = [scorer.score(r, c)["rougeL"].recall for r, c in zip(refs, cands)]
    mean, ci = mean_ci(values, resamples, seed)
    # per question the score, not the answer: an answer can repeat a training record verbatim, and this file is
    # committed in `make demo`'s workspace, whose deletion scan would rightly take it for a copy
    return {"recall": mean, "ci": ci, "questions": len(values), "per_question": values}


def mean_ci(values: list[float], resamples: int, seed: int) -> tuple[float, list[float]]:
    """The mean of `values` and its 95% bootstrap interval."""
    v = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    boot = v[torch.randint(len(v), (resamples, len(v)), generator=g)].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return v.mean().item(), [lo, hi]


def truth_items(questions: list[dict]) -> list[dict]:
    """The retained questions that TOFU's perturbed files cover, with their paraphrased and perturbed answers."""
    by_question: dict[str, dict] = {}
    for name in PERTURBED:
        for e in load_perturbed(TOFU / name):
            by_question.setdefault(e["question"], e)
    return [by_question[q["question"]] for q in questions if q["question"] in by_question]


def truth_rows(ens: Ensemble, items: list[dict]) -> tuple[list[list[int]], list[int]]:
    """Per item 1 + len(perturbed) token rows, the question's prompt and then the paraphrased answer or a
    perturbed one (encoded apart, as TOFU and sisaflow.evaluation.tofu do), and each answer's token count."""
    tok = ens.tokenizer
    prompt = TEMPLATE.split("{answer}")[0]
    rows, lengths = [], []
    for e in items:
        head = tok.encode(prompt.format(question=e["question"]))
        for answer in (e["paraphrased_answer"], *e["perturbed_answer"]):
            tail = tok.encode(answer)
            rows.append((head + tail)[-ens.context_length :])
            lengths.append(min(len(tail), len(rows[-1]) - 1))
    return rows, lengths


def truth_ratio_ci(
    ens: Ensemble, items: list[dict], lengths: list[int], scores: Scores, c: str, chosen, plan: Plan
) -> dict:
    """TOFU's truth ratio under rule `c` (sisaflow.evaluation.metrics.truth_ratio: below 1 the model prefers
    the true answer), its mean over questions and the 95% bootstrap interval."""
    w = ens.weights.cpu().double()
    per_token = [
        combined_log_probs(w, per, product, *rule(c, chosen))[-n:].mean().item()
        for per, product, n in zip(scores.per, scores.product, lengths, strict=True)
    ]
    ratios, i = [], 0
    for e in items:
        k = 1 + len(e["perturbed_answer"])
        ratios.append(truth_ratio(per_token[i], per_token[i + 1 : i + k]))
        i += k
    mean, ci = mean_ci(ratios, plan.bootstrap, plan.seed)
    return {"mean": mean, "ci": ci, "questions": len(ratios)}


def evaluate(
    ens: Ensemble,
    combines: tuple[str, ...],
    data: dict,
    plan: Plan,
    chosen: PosteriorParams | None = None,
    scored: dict[str, Scores] | None = None,
) -> dict:
    """Perplexities, answer ROUGE and generation speed of `ens` under each of `combines` (its runner's
    distributions combined), and for an ensemble of several the posterior's routing accuracy."""
    t0 = time.perf_counter()
    out: dict = {c: {} for c in combines}
    scored = scored if scored is not None else {}
    for group in SCORED_GROUPS:
        if group not in scored:
            scored[group] = constituent_scores(ens, data[group])
        scores = rule_scores(ens, scored[group], combines, chosen)
        for c in combines:
            out[c][group] = perplexity_ci(scores[c], plan.bootstrap, plan.seed)
    if data["truth"]:
        rows, lengths = truth_rows(ens, data["truth"])
        if "truth" not in scored:
            scored["truth"] = row_scores(ens, rows)
        for c in combines:
            out[c]["truth_ratio"] = truth_ratio_ci(
                ens, data["truth"], lengths, scored["truth"], c, chosen, plan
            )
    refs = [q["answer"] for q in data["questions"]]
    for c in combines:
        ens.combine, ens.posterior = rule(c, chosen)
        got, tokens_per_s = answers(ens, data["questions"], plan.new_tokens)
        out[c]["rouge_l"] = rouge_recall(refs, got, plan.bootstrap, plan.seed)
        out[c]["tokens_per_s"] = tokens_per_s
    if ens.runner.num_models > 1:
        ens.combine, ens.posterior = rule("posterior")
        out["routing_accuracy"] = routing_accuracy(ens, data["questions"], ens.runner.num_models)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def merged_ensemble(ws, device: str) -> Ensemble:
    """The served adapters merged into one model (ensemble.combine: merge)."""
    params = Params.load(ws.params_file)
    merged = dataclasses.replace(params, ensemble=dataclasses.replace(params.ensemble, combine="merge"))
    ws.params_file.write_text(json.dumps(merged.to_dict()))  # YAML is a superset of JSON
    build_registry(ws, merged)
    ens = Ensemble.load(ws, device=device)
    ens.served_from = None  # held apart from the workspace, whose registry goes back to the served combine
    ws.params_file.write_text(json.dumps(params.to_dict()))
    build_registry(ws, params)
    return ens


def layout_name(shards: int, slices: int, matched: bool = False) -> str:
    if (shards, slices) == (1, 1):
        return "monolithic"
    return f"S={shards}" + (", steps matched" if matched else "")


def layout(
    root: Path,
    setup: fg.Setup,
    plan: Plan,
    data: dict,
    shards: int,
    slices: int,
    out: dict,
    matched: bool = False,
) -> dict:
    """Train one layout (`matched`: batch size // S, see `Plan.match_steps`), evaluate it served every way, and
    (S >= 2) forget one owner."""
    name = layout_name(shards, slices, matched)
    say(f"{name}: training {shards} shard(s) x {slices} slice(s)")
    ws, params = fg.workspace(root / f"S{shards}{'m' if matched else ''}", setup, shards, slices)
    if matched:
        batch = max(1, params.train.batch_size // shards)
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, batch_size=batch))
        ws.params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    shard_corpus(ws, params.sharding)
    full = fg.train(ws, params, params.sharding.shard_ids)
    build_registry(ws, params)
    say(f"{name}: {full['tokens']:.0f} tokens in {full['seconds']:.1f} s; evaluating")
    row: dict = {"shards": shards, "slices": slices, "train": {k: full[k] for k in ("tokens", "seconds")}}
    row["matched"] = matched
    row["batch_size"] = params.train.batch_size
    ens = Ensemble.load(ws, device=plan.device)
    combines = ("mixture",) if shards == 1 else tuple(c for c in COMBINES if c != "merge")
    chosen = None
    t0 = time.perf_counter()
    scored = {group: constituent_scores(ens, data[group]) for group in SCORED_GROUPS}  # one forward each
    if shards > 1:
        choice = choose_posterior(ens, data, plan, scored)
        chosen = PosteriorParams(beta=choice["beta"], floor=choice["floor"])
        row["posterior_choice"] = choice
        say(f"{name}: held-out records chose beta {chosen.beta}, floor {chosen.floor}")
    row.update(evaluate(ens, combines, data, plan, chosen, scored))
    if shards > 1:
        row.update(evaluate(merged_ensemble(ws, plan.device), ("merge",), data, plan))
    row["eval_seconds"] = time.perf_counter() - t0  # every rule's, with the scoring they share
    del ens
    place = fg.placement(ws, params)
    own = fg.own_tokens(ws, params)
    row["expected_forget"] = {
        "tokens": ca.expected_single(full["work_tokens"], place, own),
        "model": ca.cost_model(shards, slices, 1, params.train.schedule),
    }
    if plan.forget and shards > 1:
        owner = random.Random(plan.seed).choice(sorted(place))
        say(f"{name}: forgetting owner {owner} (shard {place[owner][0]}, slice {place[owner][1]})")
        f = fg.forget(ws, params, setup, [owner], place, full, own)
        row["forget"] = {
            k: f[k] for k in ("owners", "placement", "tokens", "seconds", "tokens_ratio", "seconds_ratio")
        }
    out["layouts"][name] = row
    shutil.rmtree(ws.root, ignore_errors=True)
    return row


def zero_shot(plan: Plan, data: dict) -> dict:
    tok = load_tokenizer("base", plan.base)
    model = load_base_model(plan.base, plan.device)
    ens = Ensemble([model], [1.0], "mixture", tok, batched=False, context_length=256).to(plan.device)
    return evaluate(ens, ("mixture",), data, plan)


def machine(device: str) -> dict:
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    info["device"] = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
    info["date"] = time.strftime("%Y-%m-%d")
    return info


def run(plan: Plan, out_dir: Path, budget_s: float) -> dict:
    """Every layout of `plan`, written to out_dir/lora.json after each; markdown and plot at the end."""
    t_start = time.perf_counter()
    torch.set_num_threads(plan.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {"plan": dataclasses.asdict(plan), "machine": machine(plan.device), "layouts": {}}
    save = lambda: (out_dir / "lora.json").write_text(json.dumps(out, indent=1))  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="sisaflow-lora-bench-") as tmp:
        root = Path(tmp)
        source, chosen, holdout = subset(plan, root)
        params = params_for(plan)
        members = [as_record(r) for r in chosen]
        data = {
            "retained": fg_sample(members, plan.eval_records),
            "never_seen": fg_sample([as_record(r) for r in holdout], plan.eval_records),
            "validation": fg_sample(validation(plan), plan.eval_records),
            "questions": questions(chosen, plan.questions),
        }
        data["truth"] = truth_items(data["questions"])
        out["data"] = {
            "authors": plan.authors,
            "records": len(chosen),
            "retained_eval": len(data["retained"]),
            "never_seen_eval": len(data["never_seen"]),
            "validation_eval": len(data["validation"]),
            "questions": len(data["questions"]),
            "truth_ratio_questions": len(data["truth"]),
            # the order of every per-question list, by question_key
            "question_sha256": [question_key(q["question"]) for q in data["questions"]],
        }
        setup = fg.Setup(source=source, params=params, k=1, seed=plan.seed, holdout=[], members=[])
        say(f"base alone (zero-shot): {plan.base}")
        out["zero_shot"] = zero_shot(plan, data)
        save()
        # the monolithic reference first, then the largest S (the goal's setting) before the smaller ones, so a
        # budget cuts the least informative layouts
        layouts = [(1, 1, False)]
        for s in sorted(plan.shards, reverse=True):
            layouts += [(s, plan.slices, False)] + (
                [(s, plan.slices, True)] if plan.match_steps and s > 1 else []
            )
        for shards, slices, matched in layouts:
            if time.perf_counter() - t_start > budget_s:
                name = layout_name(shards, slices, matched)
                out.setdefault("skipped", []).append(f"{name}: past the {budget_s:.0f} s budget")
                continue
            layout(root, setup, plan, data, shards, slices, out, matched)
            save()
    out["seconds"] = time.perf_counter() - t_start
    save()
    (out_dir / "lora.md").write_text(markdown(out))
    plot(out, out_dir / "lora.png")
    return out


def fg_sample(records: list[Record], n: int) -> list[Record]:
    from sisaflow.evaluation.evaluate import sample

    return sample(records, n)


def questions(chosen: list[dict], n: int) -> list[dict]:
    """An even spread of `n` records over the subset."""
    step = max(1, len(chosen) // n)
    return chosen[::step][:n]


def question_key(question: str) -> str:
    """How results name a question: sha256 of its text. Never its record id or text: this repository is `make
    demo`'s workspace, whose deletion scan would take either for a copy of a forgotten record."""
    return hashlib.sha256(question.encode()).hexdigest()


def fmt_ppl(x: dict) -> str:
    return f"{x['ppl']:.2f} [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]"


def markdown(out: dict) -> str:
    """The quality-vs-S table and the forget costs."""
    m, d = out["machine"], out["data"]
    lines = [
        f"# LoRA over {Path(out['plan']['base']).name}: sisaflow ensemble vs an ordinary fine-tune",
        "",
        f"{m['date']}, {m['device']}, torch {m['torch']}, transformers {m['transformers']}. TOFU's last "
        f"{d['authors']} authors ({d['records']} records), {out['plan']['epochs']} epoch(s) per slice, lr "
        f"{out['plan']['learning_rate']}, LoRA r 8 on q_proj, v_proj; perplexity on {d['retained_eval']} retained "
        f"and {d['never_seen_eval']} never-seen records (TOFU holdout authors), ROUGE-L recall of greedy answers "
        f"to {d['questions']} retained questions, TOFU's truth ratio (below 1: the true answer preferred) on the "
        f"{d.get('truth_ratio_questions', 0)} of them its perturbed answers cover; 95% bootstrap intervals. Run "
        f"took {out.get('seconds', 0):.0f} s."
        + (
            " Rows 'steps matched': the constituents train with the monolithic's batch size // S, its number of "
            "optimizer steps at the same tokens."
            if out["plan"].get("match_steps")
            else ""
        ),
        "",
        "| model | combine | retained ppl | retained / monolithic | never-seen ppl | same authors' held-out ppl | "
        "answer ROUGE-L recall | truth ratio | tokens/s vs one model | routing accuracy | full training | one "
        "forget (tokens / full) | expected forget | cost model |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    mono_row = out["layouts"].get("monolithic", {}).get("mixture", {})
    mono_kept = mono_row.get("retained", {}).get("ppl")
    mono_speed = mono_row.get("tokens_per_s")

    def row(name: str, combine: str, r: dict, lay: dict | None, routing: float | None) -> str:
        ratio = f"{r['retained']['ppl'] / mono_kept:.2f}x" if mono_kept else "-"
        rouge = f"{r['rouge_l']['recall']:.3f} [{r['rouge_l']['ci'][0]:.3f}, {r['rouge_l']['ci'][1]:.3f}]"
        speed = f"{r['tokens_per_s'] / mono_speed:.2f}x" if mono_speed and "tokens_per_s" in r else "-"
        held = fmt_ppl(r["validation"]) if "validation" in r else "-"
        t = r.get("truth_ratio")
        truth = f"{t['mean']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]" if t else "-"
        train = forget = expected = model = "-"
        if lay:
            train = f"{lay['train']['tokens']:.0f} tok, {lay['train']['seconds']:.0f} s"
            if "forget" in lay:
                f = lay["forget"]
                forget = f"{f['tokens']:.0f} tok, {f['seconds']:.0f} s ({f['tokens_ratio']:.3f})"
            expected = f"{lay['expected_forget']['tokens']:.3f}"
            model = f"{lay['expected_forget']['model']:.3f}"
        acc = "-" if routing is None else f"{routing:.2f}"
        return (
            f"| {name} | {combine} | {fmt_ppl(r['retained'])} | {ratio} | {fmt_ppl(r['never_seen'])} | {held} | "
            f"{rouge} | {truth} | {speed} | {acc} | {train} | {forget} | {expected} | {model} |"
        )

    if "zero_shot" in out:
        lines.append(row("base alone (zero-shot)", "-", out["zero_shot"]["mixture"], None, None))
    for name, lay in out["layouts"].items():
        for c in COMBINES:
            if c in lay:
                label = c
                if c == "posterior-floor" and "posterior_choice" in lay:
                    ch = lay["posterior_choice"]
                    label = f"posterior, beta {ch['beta']}, floor {ch['floor']} (held-out choice)"
                routing = lay.get("routing_accuracy") if c == "posterior" else None
                lines.append(row(name, label, lay[c], lay if c == "mixture" else None, routing))
    lines += ["", *goal(out)]
    for s in out.get("skipped", []):
        lines.append(f"- skipped: {s}")
    return "\n".join(lines) + "\n"


def goal(out: dict) -> list[str]:
    """Issue 24's goal at S=8, per rule: met or not, with the numbers."""
    mono = out["layouts"].get("monolithic", {}).get("mixture")
    eights = {n: lay for n, lay in out["layouts"].items() if lay["shards"] == 8}
    if not mono or not eights:
        return ["Goal (S=8): not measured in this run."]
    lines = [
        "Goal at S=8: retained perplexity within 1.1x of the monolithic fine-tune, answer ROUGE-L recall inside "
        "its interval, never-seen perplexity no worse than the uniform mixture's, top-1 generation at >= 0.8x "
        "one model's tokens/s.",
        "",
    ]
    low, high = mono["rouge_l"]["ci"]
    for name, lay in eights.items():
        lines += goal_of(name, lay, mono, low)
    return lines


def goal_of(name: str, lay: dict, mono: dict, low: float) -> list[str]:
    lines = []
    for c in COMBINES:
        if c not in lay:
            continue
        r = lay[c]
        checks = {
            "retained": r["retained"]["ppl"] <= 1.1 * mono["retained"]["ppl"],
            "ROUGE": low <= r["rouge_l"]["recall"],
            "never-seen": r["never_seen"]["ppl"] <= lay["mixture"]["never_seen"]["ppl"],
        }
        if c == "top-1":
            checks["speed"] = r["tokens_per_s"] >= 0.8 * mono["tokens_per_s"]
        verdict = (
            "met"
            if all(checks.values())
            else "not met (" + ", ".join(k for k, v in checks.items() if not v) + ")"
        )
        lines.append(f"- {name}, {c}: {verdict}")
    return lines


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    layouts = {k: v for k, v in out["layouts"].items() if k != "monolithic" and not v.get("matched")}
    matched = [v for v in out["layouts"].values() if v.get("matched")]
    panels = (
        ("never_seen", "never-seen perplexity (TOFU holdout authors)"),
        ("retained", "retained perplexity (training records)"),
        ("rouge_l", "answer ROUGE-L recall (retained questions)"),
    )
    for ax, (metric, label) in zip(axes, panels):

        def value(r: dict, metric: str = metric) -> float:
            return r[metric]["recall"] if metric == "rouge_l" else r[metric]["ppl"]

        for c in COMBINES:
            pts = [(v["shards"], value(v[c])) for v in layouts.values() if c in v]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c)
        for c in ("mixture", "posterior"):
            pts = [(v["shards"], value(v[c])) for v in matched if c in v]
            if pts:
                ax.plot(*zip(*pts), marker="s", ls="-.", label=f"{c}, steps matched")
        if "monolithic" in out["layouts"]:
            ax.axhline(
                value(out["layouts"]["monolithic"]["mixture"]),
                color="k",
                ls="--",
                label="monolithic fine-tune",
            )
        if "zero_shot" in out:
            ax.axhline(value(out["zero_shot"]["mixture"]), color="grey", ls=":", label="base alone")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shards S")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(plan: Plan, lrs: list[float], out_dir: Path) -> dict:
    """The monolithic fine-tune on 16 of each author's 20 questions at each learning rate; perplexity on the
    other 4 (the same authors' unseen questions) and on never-seen authors. The lowest first decides."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(plan.threads)
    result: dict = {"plan": dataclasses.asdict(plan), "machine": machine(plan.device), "lrs": {}}
    with tempfile.TemporaryDirectory(prefix="sisaflow-lr-") as tmp:
        root = Path(tmp)
        source, chosen, holdout = subset(plan, root)
        train_rows = [r for r in chosen if int(r["id"].rsplit("-", 1)[-1]) % 20 < 16]
        val = [as_record(r) for r in chosen if int(r["id"].rsplit("-", 1)[-1]) % 20 >= 16]
        source.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        never = fg_sample([as_record(r) for r in holdout], plan.eval_records)
        for lr in lrs:
            params = params_for(plan, lr)
            setup = fg.Setup(source=source, params=params, k=1, seed=0, holdout=[], members=[])
            ws, params = fg.workspace(root / f"lr{lr}", setup, 1, 1)
            shard_corpus(ws, params.sharding)
            full = fg.train(ws, params, [0])
            build_registry(ws, params)
            ens = Ensemble.load(ws, device=plan.device)
            row = {"seconds": full["seconds"], "tokens": full["tokens"]}
            for name, recs in (("same_authors_unseen_questions", val), ("never_seen_authors", never)):
                row[name] = perplexity_ci(
                    token_log_probs(ens, recs, ("mixture",))["mixture"], plan.bootstrap, 0
                )
            result["lrs"][str(lr)] = row
            say(f"lr {lr}: {json.dumps(row)}")
            (out_dir / "lr_sweep.json").write_text(json.dumps(result, indent=1))
            shutil.rmtree(ws.root)
    return result


def smoke_base(directory: Path) -> str:
    from tests.lora_base import save_tiny_base

    return str(save_tiny_base(directory))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(REPO / "bases" / "smollm2-135m-instruct"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--authors", type=int, default=32)
    ap.add_argument("--shards", default="1,2,4,8,16")
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-records", type=int, default=100)
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=2400.0, help="no layout starts after this many seconds")
    ap.add_argument("--no-forget", action="store_true")
    ap.add_argument(
        "--match-steps",
        action="store_true",
        help="also each S with batch // S, side by side (Plan.match_steps)",
    )
    ap.add_argument("--sweep-lr", default=None, help="comma-separated learning rates: the sweep instead")
    ap.add_argument(
        "--smoke", action="store_true", help="a tiny random base, 4 authors, S in 1,2: checks the script"
    )
    args = ap.parse_args(argv)
    out_dir = Path(args.out).resolve()
    base = args.base
    if args.smoke:
        out_dir.mkdir(parents=True, exist_ok=True)
        base = smoke_base(out_dir / "tiny-base")
        args.authors, args.shards, args.slices, args.epochs = 4, "2", 2, 1
        args.eval_records, args.questions, args.new_tokens = 8, 3, 4
    plan = Plan(
        base=str(Path(base).resolve()),
        authors=args.authors,
        shards=tuple(int(s) for s in args.shards.split(",")),
        slices=args.slices,
        epochs=args.epochs,
        learning_rate=args.lr,
        eval_records=args.eval_records,
        questions=args.questions,
        new_tokens=args.new_tokens,
        device=args.device,
        threads=args.threads,
        bootstrap=200 if args.smoke else 1000,
        forget=not args.no_forget,
        match_steps=args.match_steps,
    )
    if args.sweep_lr:
        sweep(plan, [float(x) for x in args.sweep_lr.split(",")], out_dir)
        return 0
    run(plan, out_dir, args.budget_s)
    print((out_dir / "lora.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
