#!/usr/bin/env bash
# The GPU suite, run on the device machine from the repository root:
#
#   bash benchmarks/run_gpu_suite.sh [STEP ...] [-- BENCH_ARGS ...]
#
# STEP: tests (pytest -m gpu), bench2, bench4 (benchmarks/bench_attention.py on 2 or 4
# GPUs; any benchN works). Default: tests bench4. BENCH_ARGS go to every benchmark step.
# Outputs, at most 7 files one folder deep: $OUT/pytest.log, $OUT/nN/bench.{json,png,log}.
# Wheels carried in .whl/ (YunChang) are installed into /tmp/site first. A step starts only
# while SUITE_BUDGET_S (default 570) leaves room, and each benchmark gets what is left as
# its --budget-s, so the whole call ends inside the device tool's 10-minute limit.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT=${OUT:-$PWD/gpu_out}
BUDGET_S=${SUITE_BUDGET_S:-570}
# NVLink multicast stays off on the shared hosts (the device machines' own rule).
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

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count())'
mkdir -p "$OUT"

status=0
for step in "${steps[@]}"; do
  case $step in
    tests)
      echo "== pytest -m gpu tests ($SECONDS s into the suite)"
      python3 -m pytest -m gpu tests -q 2>&1 | tee "$OUT/pytest.log" || status=1
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
        benchmarks/bench_attention.py --out "$OUT/n$n" --budget-s "$left" "${bench_args[@]}" \
        || status=1
      ;;
    *)
      echo "unknown step $step: use tests, bench2, bench4 (or benchN)"
      exit 2
      ;;
  esac
done
exit $status
