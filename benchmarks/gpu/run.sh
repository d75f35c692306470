#!/usr/bin/env bash
# The CUDA checks in one run, for a GPU machine without a package index (a stock CUDA PyTorch image
# with transformers, timm, accelerate, pytest, pytest-xdist and hypothesis): installs the wheels that
# benchmarks/gpu/prepare.sh gathered, then runs, each step under its own time limit and all of them
# within BUDGET seconds:
#
#   gpu-tests       the tests marked gpu (bf16 casting, models split over devices, no host syncs)
#   bench-fp32      bench_steering.py --full in float32: forward, generate, extract, contexts, memory
#   bench-bf16      the same in bfloat16 (extraction left out)
#   bench-compiled  section (f), compiled generate with a static cache (CUDA graphs), bfloat16
#   cuda-tests      tests/tdsteer and tests/tdsteer_hf with TDSTEER_TEST_DEVICE=cuda
#
#   benchmarks/gpu/run.sh [RESULTS_DIR]           # default: $OUT, else benchmarks/results/gpu
#   STEPS="bench-bf16 cuda-tests" BUDGET=300 benchmarks/gpu/run.sh     # some steps only
#
# Everything printed also goes to RESULTS_DIR/gpu-check.log, beside the JSON results and JUnit files.
# DEVICE=cpu SIZE=--smoke runs the same steps on a CPU, as a check of this script.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

results=${1:-${OUT:-benchmarks/results/gpu}}
wheels=${WHEELS:-.whl}
budget=${BUDGET:-540}
steps=${STEPS:-gpu-tests bench-fp32 bench-bf16 bench-compiled cuda-tests}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
size=${SIZE:---full}
mkdir -p "$results"
exec > >(tee -a "$results/gpu-check.log") 2>&1

site=/tmp/tdsteer-site
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
else
    echo "no wheels in $wheels: using the packages of $python (benchmarks/gpu/prepare.sh gathers wheels)"
fi
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$python" - <<'PY' || exit 2
import platform
from importlib import metadata

import torch

try:
    import tdsteer_hf  # noqa: F401
except ImportError as error:
    raise SystemExit(f"{error}: install tdsteer and tdsteer-hf, or run benchmarks/gpu/prepare.sh for wheels")

names = ("torch", "transformers", "timm", "accelerate", "tensordict", "tdhook", "tdsteer", "tdsteer-hf")
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"Python {platform.python_version()}, {device}, CUDA {torch.version.cuda}")
print(", ".join(f"{name} {metadata.version(name)}" for name in names))
PY

failed=()
step() {  # step NAME LIMIT_SECONDS COMMAND...: run COMMAND if NAME is in $steps, within the budget left
    local name=$1 limit=$2
    shift 2
    [[ " $steps " == *" $name "* ]] || return 0
    local left=$((budget - SECONDS))
    if ((left < 30)); then
        echo "== $name: skipped, $left s of the budget left"
        failed+=("$name (no time left)")
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most $limit s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "== $name: exit $status after $((SECONDS - started)) s"
    ((status == 0)) || failed+=("$name (exit $status)")
}

bench=(benchmarks/bench_steering.py --device "$device" "$size")
step gpu-tests 90 env TDSTEER_TEST_DEVICE="$device" "$python" -m pytest -q -p no:cacheprovider -m gpu \
    tests/tdsteer tests/tdsteer_hf --junitxml="$results/gpu-tests.xml"
step bench-fp32 150 "$python" "${bench[@]}" --skip compiled --out "$results/steering-$device-fp32.json"
step bench-bf16 120 "$python" "${bench[@]}" --dtype bfloat16 --skip extract compiled \
    --out "$results/steering-$device-bf16.json"
step bench-compiled 150 "$python" "${bench[@]}" --dtype bfloat16 --skip forward generate extract contexts memory \
    --out "$results/steering-$device-compiled.json"
parallel=()
"$python" -c "import xdist" 2>/dev/null && parallel=(-n 8)  # pytest-xdist: the test files over 8 processes
step cuda-tests 150 env TDSTEER_TEST_DEVICE="$device" "$python" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    tests/tdsteer tests/tdsteer_hf --junitxml="$results/cuda-tests.xml"

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all steps passed in $SECONDS s"
