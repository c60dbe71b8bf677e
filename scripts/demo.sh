#!/usr/bin/env bash
# The sisaflow demo (`make demo`, after `make base`): LoRA adapters over SmolLM2-135M-Instruct, one per shard, on
# 16 TOFU authors (320 question/answer records), served with the context-weighted (posterior) combination; it
# asks one author's question, forgets the author, asks again, verifies the forget bitwise and evaluates it.
# The workspace is $DEMO_DIR (default: sisaflow-demo in the temporary directory), outside this repository: this
# repository is `make demo-tiny`'s workspace, whose deletion scan would find the TOFU records of any other
# workspace kept inside it (and rightly refuse to certify). A second run starts it afresh.
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"
export TOKENIZERS_PARALLELISM=false
WS=${DEMO_DIR:-${TMPDIR:-/tmp}/sisaflow-demo}
case "$WS" in /*) ;; *) WS="$PWD/$WS" ;; esac
case "$WS/" in "$PWD"/*) echo "DEMO_DIR must lie outside this repository (make demo-tiny's workspace)" >&2; exit 2 ;; esac
REPO=$PWD
BASE=$REPO/bases/smollm2-135m-instruct
OWNER=${DEMO_OWNER:-193}       # the author to forget: shard 2, slice 2 of 4 here
QUESTION=${DEMO_QUESTION:-8}   # her 9th record, on translations of her books (tests/test_no_tofu_copies.py)
timed() { local s=$(date +%s); "$@"; echo "  ($(( $(date +%s) - s )) s)"; }

step "1/8 sisaflow init --base: LoRA adapters over SmolLM2-135M-Instruct, S=4 shards, R=4 slices, 16 authors"
rm -rf "$WS" && mkdir -p "$WS"
# The highest-numbered author of each of the 16 (shard, slice) places: the four shards are equal (Ray's two
# workers finish together) and each slice holds one author.
python - "$WS/tofu-16.jsonl" <<'PY'
import json, sys
from sisaflow.data.sharding import shard_of, slice_of
rows = [json.loads(line) for line in open("data/tofu/records.jsonl")]
place = {}
for a in sorted({r["author_id"] for r in rows}):
    place[shard_of(str(a), 4), slice_of(str(a), 4)] = a
keep = set(place.values())
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows if r["author_id"] in keep)
print("authors:", ", ".join(f"{a} (shard {s}, slice {k})" for (s, k), a in sorted(place.items())))
PY
cp data/tofu/holdout_records.jsonl "$WS/holdout.jsonl"   # TOFU's never-seen authors, for evaluate
sisaflow init "$WS" --corpus "$WS/tofu-16.jsonl" --owner-field author_id \
    --text-template 'Question: {question}\nAnswer: {answer}' --base "$BASE" --shards 4 --slices 4
# The never-seen records, and a smaller evaluation than the default (time). `init --base` serves the adapters
# with the context-weighted (posterior) combination: each weighted by how well it predicted the question so far.
python - "$WS/params.yaml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for key, value in [("holdout", "holdout.jsonl"), ("max_records", "100"), ("rouge_records", "0")]:
    text, n = re.subn(rf"^(  {key}:) .*$", rf"\1 {value}", text, flags=re.M)
    assert n == 1, key
open(sys.argv[1], "w").write(text)
PY
sed -n '/^model:/,/^ray:/p' "$WS/params.yaml" | grep -v '^ *\(hidden_size\|layers\|heads\|intermediate_size\|tie_embeddings\|cuda_graphs\|compile_decode\|classify\|compile\|device\|deterministic\|log_every\|threads\|dropout\):'
cd "$WS"

step "2/8 sisaflow run: shard by author, train the four adapters on Ray (two at a time on two cores)"
timed sisaflow run
sisaflow status

step "3/8 a question of author $OWNER, before the deletion: TOFU's answer, the base alone, the ensemble, the routing"
timed python "$REPO/scripts/demo_answers.py" "$WS" "$OWNER" "$QUESTION" --base-too

step "4/8 sisaflow forget --owner $OWNER: retrain that author's adapter only, from the author's slice"
timed sisaflow forget --owner "$OWNER" --reason erasure-request

step "5/8 the forget's cost next to a full retraining"
python - <<'PY'
import json
from pathlib import Path
reps = {}
for f in sorted(Path("runs").glob("*.json")):
    r = json.loads(f.read_text())
    if isinstance(r, dict) and r.get("kind") in ("run", "forget"):
        reps[r["kind"]] = r
run, fg = reps["run"], reps["forget"]
full_s = sum(t["seconds"] for t in run["trained"].values())
fg_s = sum(t["seconds"] for t in fg["trained"].values())
print(f"  full training: {run['training_tokens']:,} tokens, {full_s:.0f} s of training (4 shards)")
print(f"  the forget:    {fg['training_tokens']:,} tokens, {fg_s:.0f} s (shard "
      + ", ".join(f"{s} from slice {t['from_slice']}" for s, t in fg["trained"].items()) + ")")
print(f"  ratio {fg['training_tokens'] / run['training_tokens']:.3f} of the tokens; an ordinary fine-tune "
      "would retrain on every other record (about 1)")
PY

step "6/8 the same question after the deletion"
timed python "$REPO/scripts/demo_answers.py" "$WS" "$OWNER" "$QUESTION"

step "7/8 sisaflow verify --exact: retrain the author's shard from scratch without the author; equal?"
SHARD=$(python -c "from sisaflow.data.sharding import shard_of; print(shard_of('$OWNER', 4))")
timed sisaflow verify --exact --shard "$SHARD"

step "8/8 sisaflow evaluate --no-baseline: utility, membership attacks, the forgotten author before and after"
timed sisaflow evaluate --no-baseline
sed -n '/^## Before and after/,/^## Plots/p' reports/report.md
printf '\ndemo finished in %ss (workspace: %s)\n' "$(( $(date +%s) - t0 ))" "$WS"
