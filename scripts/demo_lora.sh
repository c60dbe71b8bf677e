#!/usr/bin/env bash
# The sisaflow demo over a pretrained base: LoRA adapters over SmolLM2-135M-Instruct (`make base`), one per
# shard, on the last 32 TOFU authors (640 question/answer records), then forgets one. Run through `make demo-lora`.
# The workspace is $DEMO_LORA_DIR (default: sisaflow-demo-lora in the temporary directory), outside this
# repository: this repository is `make demo`'s workspace, whose deletion scan would find the TOFU records of any
# other workspace kept inside it (and rightly refuse to certify). A second run starts it afresh.
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"
export TOKENIZERS_PARALLELISM=false
WS=${DEMO_LORA_DIR:-${TMPDIR:-/tmp}/sisaflow-demo-lora}
case "$WS" in /*) ;; *) WS="$PWD/$WS" ;; esac
case "$WS/" in "$PWD"/*) echo "DEMO_LORA_DIR must lie outside this repository (make demo's workspace)" >&2; exit 2 ;; esac
BASE=$PWD/bases/smollm2-135m-instruct
OWNER=190            # Hina Ameen, of TOFU's forget05 set: shard 3, slice 2 of 4 here
QUESTION=8           # her 9th record asks the year of her award (no record id here: see tests/test_no_tofu_copies.py)

step "1/6 sisaflow init --base: a workspace fine-tuning LoRA adapters over SmolLM2-135M-Instruct, S=4, R=4"
rm -rf "$WS" && mkdir -p "$WS"
python - "$WS/tofu-last32.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open("data/tofu/records.jsonl")]
keep = set(sorted({r["author_id"] for r in rows})[-32:])
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows if r["author_id"] in keep)
PY
sisaflow init "$WS" --corpus "$WS/tofu-last32.jsonl" --owner-field author_id \
    --text-template 'Question: {question}\nAnswer: {answer}' --base "$BASE" --shards 4 --slices 4
sed -n '/^model:/,/^ensemble:/p' "$WS/params.yaml" | grep -v '^ *\(hidden_size\|layers\|heads\|intermediate_size\|tie_embeddings\):'
cd "$WS"

step "2/6 sisaflow run: shard by author, train the four adapters on Ray (two at a time on two cores)"
sisaflow run
sisaflow status

step "3/6 one of the forgotten author's questions, answered before the deletion"
python "$OLDPWD/scripts/demo_lora_answers.py" "$WS" "$OWNER" "$QUESTION" --base-too

step "4/6 sisaflow forget --owner $OWNER: retrain that author's adapter only, from the author's slice"
sisaflow forget --owner "$OWNER" --reason "demo erasure request"

step "5/6 the same question after the deletion"
python "$OLDPWD/scripts/demo_lora_answers.py" "$WS" "$OWNER" "$QUESTION"
echo "  (the monolithic fine-tune would forget only by training again on every other record: see make bench-lora)"

step "6/6 sisaflow verify --exact: retrain the forgotten author's shard from scratch without the author; equal?"
SHARD=$(python -c "from sisaflow.data.sharding import shard_of; print(shard_of('$OWNER', 4))")
sisaflow verify --exact --shard "$SHARD"
printf '\ndemo-lora finished in %ss\n' "$(( $(date +%s) - t0 ))"
