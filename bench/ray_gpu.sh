#!/usr/bin/env bash
# Issue 18 point 4 on the GPU machine: S=8 shards as Ray tasks sharing its one GPU (bench/ray_gpu.py). That machine
# has no Ray, and a call carries at most 64 MiB of working tree: Ray's 79 MB wheel goes in two halves, over two
# calls to the same warm machine (it stays warm 30 s after a call, and keeps files outside $OUT), as
# bench/smollm2_gpu.sh does for the GGUF. Of Ray's own requirements (`unzip -p ray-*.whl '*/METADATA' | grep
# ^Requires-Dist`, extras left out) the machine's image lacks only jsonschema, which brings referencing,
# jsonschema-specifications and rpds-py (attrs and typing-extensions it has; aiohttp and its kin come inside the
# Ray wheel); sisaflow's modules that bench/ray_gpu.py imports need nothing more than bench/gpu.py does there.
#
#   bash bench/ray_gpu.sh prepare   # here, once: .carry/ray-a, .carry/ray-b (the wheel's halves) and
#                                   # .carry/ray-wheels (jsonschema and its kin, and ray.sha256: the wheel's name and hash)
#   call 1: carry [".carry/ray-a"], timeout_s 120:        bash bench/ray_gpu.sh stash
#   call 2, at once: carry [".carry/ray-b", ".carry/ray-wheels"], timeout_s 480:
#                                   bash bench/ray_gpu.sh run
#   (then give_back). Each call carries ~38 MiB of wheel plus the repository (~6 MiB).
#
# `run` joins the halves, checks the sha256, installs Ray and the wheels under /tmp/site (pip, offline, no
# dependency resolution), then runs bench/ray_gpu.py --out $OUT/ray under a timeout (RAY_GPU_TIMEOUT, 330 s; the
# script itself starts no run after 210 s), its log in $OUT/ray_gpu.log; it prints the log's tail and the table.
# RAY_GPU_FLAGS passes flags to the script (e.g. --records 2048 for a shorter run, --gpus-per-shard 0.25).
#
# A dry run on a CPU machine (Python 3.11 here): RAY_CARRY=/tmp/x/.carry RAY_GPU_PY=3.11 ... prepare, then stash and
# run with RAY_STASH, RAY_SITE (fresh folders), RAY_GPU_PYTHON=.venv/bin/python and RAY_GPU_FLAGS=--smoke.
set -u
carry=${RAY_CARRY:-.carry}
stash=${RAY_STASH:-/tmp/raystash}
site=${RAY_SITE:-/tmp/site}
py=${RAY_GPU_PYTHON:-python3}
pyver=${RAY_GPU_PY:-3.12} # the GPU machine's Python
pin() { sed -n "s/^$1==//p" constraints.txt; } # the version constraints.txt pins
# jsonschema and what it needs, at the versions the project's own environment runs Ray 2.60 with
EXTRA="jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 rpds-py==2026.9.1"
case "${1:-}" in
prepare)
    set -e
    version=$(pin ray)
    [ -n "$version" ] || {
        echo "ray_gpu: constraints.txt pins no ray" >&2
        exit 1
    }
    rm -rf "$carry/ray-a" "$carry/ray-b" "$carry/ray-wheels"
    mkdir -p "$carry/ray-wheels"
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.carry/' "$exclude" 2>/dev/null || echo '/.carry/' >>"$exclude"
    tmp=$(mktemp -d)
    platforms=""
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms="$platforms --platform $p"
    done
    # shellcheck disable=SC2086  # several flags, several requirements
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        $platforms -d "$tmp" "ray==$version"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        $platforms -d "$carry/ray-wheels" $EXTRA
    wheel=$(cd "$tmp" && ls ray-"$version"-*.whl)
    echo "Ray's requirements (the GPU machine must have each, or it is carried):"
    unzip -p "$tmp/$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /'
    (cd "$tmp" && sha256sum "$wheel") >"$carry/ray-wheels/ray.sha256"
    size=$(stat -c %s "$tmp/$wheel")
    head -c $((size / 2)) "$tmp/$wheel" >"$carry/ray-a"
    tail -c +$((size / 2 + 1)) "$tmp/$wheel" >"$carry/ray-b"
    rm -rf "$tmp"
    sha=$(cut -d' ' -f1 "$carry/ray-wheels/ray.sha256")
    cat "$carry/ray-a" "$carry/ray-b" | sha256sum | grep -q "^$sha " || {
        echo "ray_gpu: the halves do not join to the wheel" >&2
        exit 1
    }
    ls -l "$carry/ray-a" "$carry/ray-b" "$carry/ray-wheels"
    du -sh "$carry/ray-a" "$carry/ray-b" "$carry/ray-wheels"
    ;;
stash)
    mkdir -p "$stash" && cp "$carry/ray-a" "$stash/" || {
        echo "ray_gpu: no $carry/ray-a here: run 'bash bench/ray_gpu.sh prepare' and carry it" >&2
        exit 1
    }
    echo "ray_gpu: first half of Ray's wheel stashed in $stash ($(stat -c %s "$stash/ray-a") bytes)"
    ;;
run)
    out=${OUT:-/tmp/gpu-out}
    mkdir -p "$out"
    if [ ! -f "$stash/ray-a" ]; then
        echo "ray_gpu: $stash/ray-a is missing: this is not the machine of call 1 (it went back); run call 1 again" >&2
        exit 1
    fi
    if [ ! -f "$carry/ray-b" ] || [ ! -f "$carry/ray-wheels/ray.sha256" ]; then
        echo "ray_gpu: carry $carry/ray-b and $carry/ray-wheels in this call" >&2
        exit 1
    fi
    read -r sha wheel <"$carry/ray-wheels/ray.sha256"
    cat "$stash/ray-a" "$carry/ray-b" >"$stash/$wheel" || exit 1
    echo "$sha  $stash/$wheel" | sha256sum -c --quiet || {
        echo "ray_gpu: the joined wheel's sha256 is not $sha" >&2
        exit 1
    }
    t0=$(date +%s)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$stash/$wheel" "$carry"/ray-wheels/*.whl || exit 1
    echo "ray_gpu: Ray installed under $site in $(($(date +%s) - t0)) s"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    export PYTHONPATH="src:.:$site" PYTHONUNBUFFERED=1
    # shellcheck disable=SC2086  # RAY_GPU_FLAGS holds several flags
    timeout -k 15 "${RAY_GPU_TIMEOUT:-330}" "$py" bench/ray_gpu.py --out "$out/ray" ${RAY_GPU_FLAGS:-} \
        >"$out/ray_gpu.log" 2>&1
    echo "ray_gpu exit $?"
    grep -v -i warn "$out/ray_gpu.log" | tail -40
    ;;
*)
    echo "usage: bash bench/ray_gpu.sh prepare|stash|run (see the head of this file)" >&2
    exit 2
    ;;
esac
