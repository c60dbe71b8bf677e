#!/usr/bin/env bash
# One device call, about 9 minutes: the `gpu`-marked tests, then bench/gpu.py, sections in the order given.
# Run from the repository root on the GPU machine (torch, transformers, peft, pyarrow; no Ray, Prefect or DVC):
#     bash bench/gpu_session.sh            # results under $OUT (the device tool's folder) or /tmp/gpu-out
#     GPU_SECTIONS=train GPU_FLAGS=--compiled-fast bash bench/gpu_session.sh
# Every measurement is in $OUT/gpu/gpu.json as soon as it is taken, so a timeout keeps what was measured.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src:.
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# the tests set cuBLAS's workspace themselves (the library's own path): not exported here
timeout "${GPU_TEST_TIMEOUT:-180}" python3 -m pytest -q -rfEs -p no:cacheprovider -m gpu tests/unit/test_gpu_path.py \
    >"$out/pytest.log" 2>&1
echo "pytest exit $?"
grep -v -i warn "$out/pytest.log" | tail -25
# shellcheck disable=SC2086  # GPU_FLAGS holds several flags
timeout "${GPU_BENCH_TIMEOUT:-360}" python3 bench/gpu.py --out "$out/gpu" \
    --only "${GPU_SECTIONS:-ensemble,lora-ensemble,lora-train,train}" --budget-s "${GPU_BUDGET:-300}" ${GPU_FLAGS:-} \
    >"$out/gpu.log" 2>&1
echo "bench exit $?"
grep -v -i warn "$out/gpu.log" | tail -60
