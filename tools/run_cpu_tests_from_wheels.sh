#!/usr/bin/env bash
# The CPU test suite against the wheels carried in .whl/ (megatron-core 0.19.x, which needs
# Python >= 3.12: CI's machine has 3.11), on a machine without network such as the GPU
# machine (Python 3.12, torch 2.11). GPUs are hidden, so every test takes its gloo/CPU path.
#
#   bash tools/run_cpu_tests_from_wheels.sh [more pytest arguments, e.g. -k megatron]
#
# Fill .whl/ (git-ignored) beforehand, on a machine with PyPI; megatron-core 0.19 needs
# nothing beyond torch, numpy and packaging, which the GPU machine has:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl \
#       megatron-core==0.19.2
# Wheels go to /tmp/site (nothing of the machine's own Python changes); the log is tee'd
# to $OUT/cpu_tests_from_wheels.log when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "no wheels in .whl/: download them first (see the top of $0)" >&2
    exit 2
fi
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${wheels[@]}"
export PYTHONPATH="$site:$PWD" CUDA_VISIBLE_DEVICES=""

log=/dev/null
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    log="$OUT/cpu_tests_from_wheels.log"
fi
{
    python3 -c 'import sys, torch, megatron.core as mc
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {mc.__version__}")'
    python3 -m pytest -q -x tests -p no:cacheprovider "$@"
} 2>&1 | tee "$log"  # pipefail: the exit status is pytest's
