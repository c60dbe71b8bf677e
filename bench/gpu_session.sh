#!/usr/bin/env bash
# Issue 18's GPU plan: everything a device session measures, in two calls that fit its 15 device-minutes.
#
#   here, first (no device time):  bash bench/ray_gpu.sh prepare       # Ray's wheel in halves, under .carry/
#   call 1, carry [".carry/ray-a"], timeout_s 410:                       bash bench/gpu_session.sh 1
#       - stash the first half of Ray's wheel on the machine                         (seconds)
#       - pytest -m gpu: the CUDA tests (issue 18.5's target: 120 s)           timeout 150 s
#       - bench/graph_generate.py: generation at graph speed (18.1, 18.2)      timeout 250 s (no section after 130 s)
#   call 2, at once (the machine keeps files 30 s), carry [".carry/ray-b", ".carry/ray-wheels"], timeout_s 360:
#                                                                        bash bench/gpu_session.sh 2
#       - Ray: join, check and install the wheel, then bench/ray_gpu.py        timeout 150 s (18.4)
#       - bench/gpu.py --only train-profile: compiled training's kernels and   timeout 200 s (18.3)
#         the deterministic settings (sweep: strict-padded, nondeterministic)
#   then give_back, and copy the files into bench/results/ and the tables into bench/RESULTS.md.
# Time: a start of 1-2 minutes, 6.8 + 6 minutes of commands at most, transfers: about 15 minutes; no command
# over 10. Each script writes its JSON after every measurement, so a timeout keeps what was measured.
# Results under $OUT (the device tool's folder; /tmp/gpu-out elsewhere), at most 8 files a call:
#   call 1: pytest.log, graph.log, graph/graph.json, graph/graph.md
#   call 2: ray_gpu.log, ray/ray_gpu.json, ray/ray_gpu.md, gpu.log, gpu/gpu.json, gpu/gpu.md, gpu/train_profile.md
# What a later session may add (each its own call; the older heads say how): issue 5's sections of bench/gpu.py
# (`python3 bench/gpu.py --only train,lora-train --out $OUT/gpu`), SmolLM2 itself and issue 15's LoRA quality
# (bench/smollm2_gpu.sh).
#
# GPU_SMOKE=1 runs both phases on a CPU with every script's --smoke mode (Ray from the environment, no wheel):
# tests/unit/bench/test_gpu_session.py does, so that this plan cannot rot between sessions with a device.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src:.
out=${OUT:-/tmp/gpu-out}
py=${PYTHON:-python3}
smoke=${GPU_SMOKE:-0}
flag() { [ "$smoke" = 1 ] && echo --smoke; }
mkdir -p "$out"
[ "$smoke" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
case "${1:-}" in
1)
    if [ "$smoke" != 1 ]; then
        bash bench/ray_gpu.sh stash || echo "no Ray half stashed: call 2 will measure training but not Ray"
    fi
    # the tests set cuBLAS's workspace themselves (the library's own path): not exported here
    timeout "${GPU_TEST_TIMEOUT:-150}" "$py" -m pytest -q -rfEs -p no:cacheprovider -m gpu --durations=15 \
        tests/unit/inference/test_gpu_path.py tests/unit/inference/test_graphed.py >"$out/pytest.log" 2>&1
    echo "pytest exit $?"
    grep -v -i warn "$out/pytest.log" | tail -25
    # shellcheck disable=SC2046  # flag prints nothing or one word
    timeout "${GRAPH_TIMEOUT:-250}" "$py" bench/graph_generate.py --out "$out/graph" --budget-s "${GRAPH_BUDGET:-130}" \
        $(flag) >"$out/graph.log" 2>&1
    echo "graph_generate exit $?"
    grep -v -i warn "$out/graph.log" | tail -40
    ;;
2)
    if [ "$smoke" = 1 ]; then
        timeout 150 "$py" bench/ray_gpu.py --smoke --out "$out/ray" >"$out/ray_gpu.log" 2>&1
        echo "ray_gpu exit $?"
    else
        RAY_GPU_TIMEOUT=150 RAY_GPU_FLAGS="--records 2048 --budget-s 90" bash bench/ray_gpu.sh run
    fi
    # shellcheck disable=SC2046
    timeout "${PROFILE_TIMEOUT:-200}" "$py" bench/gpu.py --only train-profile --out "$out/gpu" \
        --profile-sweep strict-padded,nondeterministic --profile-budget-s "${PROFILE_BUDGET:-130}" $(flag) \
        >"$out/gpu.log" 2>&1
    echo "train-profile exit $?"
    grep -v -i warn "$out/gpu.log" | tail -60
    ;;
*)
    echo "usage: bash bench/gpu_session.sh 1|2 (see the head of this file)" >&2
    exit 2
    ;;
esac
