#!/usr/bin/env bash
# The GPU suite, run on a machine with NVIDIA GPUs from the repository root:
#
#   [RESULTS_DIR=DIR] [WHEELS_DIR=DIR] [SUITE_BUDGET_S=S] \
#     bash benchmarks/run_gpu_suite.sh [STEP ...] [-- BENCH_ARGS ...]
#
# STEP: tests (pytest -m gpu), bench2, bench4 (benchmarks/bench_attention.py on 2 or 4
# GPUs; any benchN works). Default: tests bench4. BENCH_ARGS go to every benchmark step.
# Outputs go to RESULTS_DIR (default runs/gpu_suite): RESULTS_DIR/pytest.log,
# RESULTS_DIR/nN/bench.{json,png,log}.
# Wheels in WHEELS_DIR (default wheels/, git-ignored; e.g. YunChang) are installed offline
# into /tmp/site first. A step starts only while SUITE_BUDGET_S (default 570) leaves room,
# and each benchmark gets what is left as its --budget-s, so the whole suite ends within
# about SUITE_BUDGET_S seconds (the default keeps it under 10 minutes). Relative paths in
# RESULTS_DIR and WHEELS_DIR are taken from the repository root.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

RESULTS_DIR=${RESULTS_DIR:-${OUT:-$PWD/runs/gpu_suite}}
WHEELS_DIR=${WHEELS_DIR:-wheels}
BUDGET_S=${SUITE_BUDGET_S:-570}
# NCCL_NVLS_ENABLE=0 (with the two settings after it) keeps NVLink SHARP/multicast off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1

steps=()
bench_args=()
while (($#)); do
  if [[ $1 == -- ]]; then
    shift
    bench_args=("$@")
    break
  fi
  steps+=("$1")
  shift
done
((${#steps[@]})) || steps=(tests bench4)

if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS_DIR"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count())'
mkdir -p "$RESULTS_DIR"

status=0
for step in "${steps[@]}"; do
  case $step in
    tests)
      echo "== pytest -m gpu tests ($SECONDS s into the suite)"
      python3 -m pytest -m gpu tests -q 2>&1 | tee "$RESULTS_DIR/pytest.log" || status=1
      ;;
    bench[1-9]*)
      n=${step#bench}
      left=$((BUDGET_S - SECONDS - 45))  # room for start-up and the last case
      if ((left < 60)); then
        echo "== $step not started: only ${left} s of the suite's budget left"
        status=1
        continue
      fi
      echo "== benchmark on $n GPUs, budget ${left} s ($SECONDS s into the suite)"
      python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        benchmarks/bench_attention.py --out "$RESULTS_DIR/n$n" --budget-s "$left" "${bench_args[@]}" \
        || status=1
      ;;
    *)
      echo "unknown step $step: use tests, bench2, bench4 (or benchN)"
      exit 2
      ;;
  esac
done
exit $status
