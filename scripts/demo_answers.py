"""The demo's question side by side: TOFU's reference answer, the base alone (with --base-too), the served
ensemble, which shard the ensemble's routing chose for the question (each served shard's weight, and which one
holds the author), and the perplexity of the author's records under the ensemble (and the base): a forget raises
it to what records the ensemble never saw get.

    python scripts/demo_answers.py WORKSPACE OWNER INDEX [--base-too]   # the owner's INDEX-th record
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path


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
    from sisaflow.data.sharding import shard_of
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
    label = f"sisaflow ensemble (S={len(ens.shards)} served, {ens.combine}, version {ens.version})"
    answers.append((label, ens.generate(prompt, max_new_tokens=args.new_tokens)))
    routing = ens.routing_weights(prompt)
    ppl.append(("the ensemble", perplexity(ens, texts)))

    print(f"Q: {row['question']}")
    for who, text in answers:
        print(f"  {who}:")
        print(
            textwrap.indent(
                textwrap.fill(text.strip() or "(no answer: it ended the text at once)", 100), "      "
            )
        )
    home = shard_of(args.owner, params.sharding.shards)
    print(f"routing (each served shard's weight for this question; author {args.owner} is in shard {home}):")
    for shard, w in zip(ens.shards, routing, strict=True):
        print(f"  shard {shard}: {w:.3g}" + ("   <- the author's shard" if shard == home else ""))
    top = ens.shards[max(range(len(routing)), key=routing.__getitem__)]
    print(f"  the routing chose shard {top}" + (" (the author's)" if top == home else ""))
    said = ", ".join(f"{who} {p:.2f}" for who, p in ppl)
    print(f"perplexity of author {row['author_id']}'s {len(texts)} records: {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
