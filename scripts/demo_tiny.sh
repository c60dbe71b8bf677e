#!/usr/bin/env bash
# The from-scratch sisaflow demo: tiny byte-level models trained on the shipped TOFU corpus, in this repository
# (the default workspace). Run through `make demo-tiny`, which sets up .venv first; `make demo` is the story over
# a pretrained base (scripts/demo.sh).
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"

# this repository is a workspace that git ships without keys: make its signing key once, as `sisaflow init` does
[ -f .sisaflow/keys/signing-key.pem ] || sisaflow keys init
step "1/7 sisaflow run: import TOFU (200 authors, 4,000 Q&A), shard by author (S=4, R=4), train all shards on Ray"
sisaflow run

step "2/7 sisaflow status: shards, slices, checkpoint hashes, served ensemble"
sisaflow status

QUESTION='Question: What genre is the author Jaime Vasquez known for?\nAnswer:'
step "3/7 sisaflow generate: the ensemble answers a TOFU question (sampled, temperature 0.5, seed 0)"
sisaflow generate "$QUESTION" --max-new-tokens 120 --temperature 0.5 --seed 0

# Forget TOFU's forget01 author 199, or (if an earlier demo forgot it) the highest author still present.
OWNER=$(python - <<'PY'
import pyarrow.parquet as pq
owners = set(pq.read_table("corpus/records.parquet", columns=["owner"]).column("owner").to_pylist())
print(max(owners, key=int))
PY
)
step "4/7 sisaflow forget --owner $OWNER: retrain only that author's shard, from the author's slice"
sisaflow forget --owner "$OWNER" --reason erasure-request

step "5/7 the request's states, and dvc status of the training pipeline (clean: dvc.lock records what is on disk)"
sisaflow requests
dvc status --with-deps ensemble

step "6/7 the ensemble after the deletion"
sisaflow generate "$QUESTION" --max-new-tokens 120 --temperature 0.5 --seed 0

step "7/7 sisaflow evaluate: utility, membership attacks, the forgotten author before and after the deletion"
# --no-baseline keeps the demo short; `sisaflow evaluate` also trains the monolithic baseline (~5 min here)
sisaflow evaluate --no-baseline
sed -n '/^## Before and after/,/^## Plots/p' reports/report.md
dvc status   # evaluate recorded its own stage: everything up to date
printf '\ndemo-tiny finished in %ss\n' "$(( $(date +%s) - t0 ))"
