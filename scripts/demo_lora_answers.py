"""The demo-lora question side by side: the reference answer, the base alone, the served ensemble, and the
monolithic fine-tune of `make bench-lora` (same base, records and compute; bench/results/lora/lora.json); then
the perplexity of the question's author's records under the ensemble (and the base): a forget raises it to what
records the ensemble never saw get.

    python scripts/demo_lora_answers.py WORKSPACE OWNER INDEX [--base-too]   # the owner's INDEX-th record
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "results" / "lora" / "lora.json"


def bench_answer(question: str) -> str:
    """How the monolithic fine-tune of `make bench-lora` answered `question`, if it was asked: its ROUGE-L recall
    against the reference. The bench keeps scores, never answers or record ids (an answer can repeat a training
    record, and this repository is `make demo`'s workspace, whose deletion scan would take it for a copy)."""
    if not BENCH.is_file():
        return "(not measured yet: run make bench-lora)"
    res = json.loads(BENCH.read_text())
    keys = res.get("data", {}).get("question_sha256", [])
    rouge = res.get("layouts", {}).get("monolithic", {}).get("mixture", {}).get("rouge_l", {})
    key = hashlib.sha256(question.encode()).hexdigest()
    if key not in keys or "per_question" not in rouge:
        return "(this question is not among make bench-lora's)"
    return f"(its answer is not kept) ROUGE-L recall {rouge['per_question'][keys.index(key)]:.2f} against the reference"


def perplexity(model, texts: list[str]) -> float:
    scores = [model.score(t) for t in texts]
    return math.exp(-sum(s["log_likelihood"] for s in scores) / sum(s["tokens"] for s in scores))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace")
    ap.add_argument("owner", help="the author (TOFU's author_id)")
    ap.add_argument("index", type=int, help="which of the author's records asks the question (0-based)")
    ap.add_argument("--base-too", action="store_true", help="also the base alone (loads it once more)")
    ap.add_argument("--new-tokens", type=int, default=40)
    args = ap.parse_args()

    from sisaflow.core.paths import Workspace
    from sisaflow.inference.ensemble import Ensemble
    from sisaflow.pipeline.steps import load

    ws = Workspace(Path(args.workspace).resolve())
    params = load(ws)
    rows = [json.loads(x) for x in ws.source(params.corpus.path).read_text().splitlines() if x.strip()]
    own = [r for r in rows if str(r["author_id"]) == args.owner]
    row = own[args.index]
    # the author's records as training saw them (the corpus source keeps them: sisaflow never writes it)
    texts = [params.corpus.text_template.format(**r) for r in own]
    prompt = f"Question: {row['question']}\nAnswer:"
    answers = [("reference (TOFU)", row["answer"])]
    ppl = []
    if args.base_too:
        from sisaflow.models.pretrained import load_base_model
        from sisaflow.models.tokenizer import load_tokenizer

        tok = load_tokenizer("base", params.model.base)
        model = load_base_model(params.model.base)
        base = Ensemble(
            [model], [1.0], "mixture", tok, batched=False, context_length=params.model.context_length
        )
        answers.append(("base alone (zero-shot)", base.generate(prompt, max_new_tokens=args.new_tokens)))
        ppl.append(("base alone", perplexity(base, texts)))
    ens = Ensemble.load(ws)
    label = f"sisaflow ensemble (S={len(ens.shards)}, {params.ensemble.combine}, version {ens.version})"
    answers.append((label, ens.generate(prompt, max_new_tokens=args.new_tokens)))
    ppl.append(("the ensemble", perplexity(ens, texts)))
    answers.append(("monolithic fine-tune, all records (make bench-lora)", bench_answer(row["question"])))

    print(f"Q: {row['question']}")
    for who, text in answers:
        print(f"  {who}:")
        print(
            textwrap.indent(
                textwrap.fill(text.strip() or "(no answer: it ended the text at once)", 100), "      "
            )
        )
    said = ", ".join(f"{who} {p:.2f}" for who, p in ppl)
    print(f"perplexity of author {row['author_id']}'s {len(texts)} records: {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
