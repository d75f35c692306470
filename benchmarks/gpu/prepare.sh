#!/usr/bin/env bash
# Gather, on a machine with a package index, every wheel that benchmarks/gpu/run.sh installs on a CUDA
# machine that has none: the four tdsteer distributions built from this checkout (tdsteer-eval for its
# entry points only: lm-eval is not installed there), and the dependencies that a stock CUDA PyTorch
# image lacks (tensordict, tdhook, pyvers, steering-vectors), at the versions of this environment.
#
#   source .nox/shared-py3.11/bin/activate
#   benchmarks/gpu/prepare.sh [WHEEL_DIR] [TARGET_PYTHON_VERSION]     # defaults: .whl 3.12
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

wheels=${1:-.whl}
target_python=${2:-3.12}
rm -rf "$wheels"
mkdir -p "$wheels"

python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$wheels" \
    ./packages/tdsteer ./packages/tdsteer-hf ./packages/tdsteer-timm ./evals

pins=$(python - <<'PY'
from importlib import metadata

pins = []
for name in ("tensordict", "tdhook", "pyvers", "steering-vectors"):
    try:
        pins.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:  # steering-vectors is optional: the benchmark skips it
        pass
print(" ".join(pins))
PY
)
# shellcheck disable=SC2086 # one argument per pin
python -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
    --python-version "$target_python" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    $pins
rm -rf packages/*/build evals/build  # what setuptools leaves beside the sources
ls -1 "$wheels"
du -sh "$wheels"
