#!/usr/bin/env bash
# A device call as one prepared script: the `gpu`-marked tests, then bench/gpu.py's sections in the order given.
# Run from the repository root on the GPU machine (torch, transformers, peft, pyarrow; no Ray, Prefect or DVC).
# With the defaults it takes at most 9 minutes (tests 180 s, sections 360 s); a session's 15 device-minutes fit
# this call and a shorter second one for the sections it skipped:
#     bash bench/gpu_session.sh                                                   # call 1 (timeout 570 s)
#     GPU_TESTS=0 GPU_SECTIONS=lora-ensemble,lora-train GPU_BUDGET=150 bash bench/gpu_session.sh   # call 2
#     GPU_SECTIONS=train GPU_FLAGS="--train-modes compiled --compiled-fast" bash bench/gpu_session.sh      # diagnosis of compiled training
# With SmolLM2 on the GPU as well (its file travels in two halves, one per call; bench/smollm2_gpu.sh's head):
#     bash bench/smollm2_gpu.sh prepare                                           # here, first
#     bash bench/smollm2_gpu.sh stash && GPU_BENCH_TIMEOUT=330 bash bench/gpu_session.sh   # call 1 (timeout 530 s)
#     bash bench/smollm2_gpu.sh run; GPU_TESTS=0 GPU_SECTIONS=lora-ensemble,lora-train GPU_BUDGET=40 \
#         GPU_BENCH_TIMEOUT=100 bash bench/gpu_session.sh                          # call 2 at once (timeout 240 s)
# (a machine's start takes 1-2 of the 15 minutes; give_back right after call 2)
# Results under $OUT (the device tool's folder) or /tmp/gpu-out; every measurement is in gpu/gpu.json as soon
# as it is taken, so a timeout keeps what was measured.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src:.
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ "${GPU_TESTS:-1}" != 0 ]; then
    # the tests set cuBLAS's workspace themselves (the library's own path): not exported here
    timeout "${GPU_TEST_TIMEOUT:-180}" python3 -m pytest -q -rfEs -p no:cacheprovider -m gpu \
        tests/unit/inference/test_gpu_path.py >"$out/pytest.log" 2>&1
    echo "pytest exit $?"
    grep -v -i warn "$out/pytest.log" | tail -25
fi
# GPU_FLAGS defaults to compiled training only (eager was measured on 2026-11-28); GPU_FLAGS= measures both
# shellcheck disable=SC2086  # GPU_FLAGS holds several flags
timeout "${GPU_BENCH_TIMEOUT:-360}" python3 bench/gpu.py --out "$out/gpu" \
    --only "${GPU_SECTIONS:-ensemble,train,lora-ensemble,lora-train}" --budget-s "${GPU_BUDGET:-250}" ${GPU_FLAGS---train-modes compiled} \
    >"$out/gpu.log" 2>&1
echo "bench exit $?"
grep -v -i warn "$out/gpu.log" | tail -60
