#!/usr/bin/env bash
# The CPU test suite against wheels installed offline from WHEELS_DIR (default wheels/,
# git-ignored): megatron-core 0.19.x, which needs Python >= 3.12 while CI runs 3.11, on a
# machine without network access, e.g. a GPU host with Python 3.12 and torch 2.11. GPUs are
# hidden, so every test takes its gloo/CPU path.
#
#   [WHEELS_DIR=DIR] [RESULTS_DIR=DIR] bash tools/run_cpu_tests_from_wheels.sh \
#       [more pytest arguments, e.g. -k megatron]
#
# Fill WHEELS_DIR beforehand, on a machine with PyPI access; megatron-core 0.19 needs
# nothing beyond torch, numpy and packaging, which such a GPU host has:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform any -d wheels \
#       megatron-core==0.19.2
# Wheels go to /tmp/site (nothing of the machine's own Python changes); the log is tee'd
# to RESULTS_DIR/cpu_tests_from_wheels.log when RESULTS_DIR is set. Relative paths are
# taken from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS_DIR=${WHEELS_DIR:-wheels}
RESULTS_DIR=${RESULTS_DIR:-${OUT:-}}
shopt -s nullglob
wheels=("$WHEELS_DIR"/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "no wheels in $WHEELS_DIR/: download them first (see the top of $0)" >&2
    exit 2
fi
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${wheels[@]}"
export PYTHONPATH="$site:$PWD" CUDA_VISIBLE_DEVICES=""

log=/dev/null
if [[ -n "$RESULTS_DIR" ]]; then
    mkdir -p "$RESULTS_DIR"
    log="$RESULTS_DIR/cpu_tests_from_wheels.log"
fi
{
    python3 -c 'import sys, torch, megatron.core as mc
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {mc.__version__}")'
    python3 -m pytest -q -x tests -p no:cacheprovider "$@"
} 2>&1 | tee "$log"  # pipefail: the exit status is pytest's
