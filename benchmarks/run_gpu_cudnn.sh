#!/usr/bin/env bash
# The cuDNN-frontend kernel (backend 'cudnn') on one GPU, from the repository root:
#
#   [OUT=DIR] [TESTS_TIMEOUT_S=S] [BENCH_BUDGET_S=S] bash benchmarks/run_gpu_cudnn.sh
#
# 1. installs the wheels in .whl/ (nvidia-cudnn-frontend 1.28.x for this machine's
#    Python; git-ignored, carried by hand) offline into /tmp/site;
# 2. prints the versions: torch, CUDA, cuDNN (torch's and the frontend's backend), the
#    frontend, the GPU;
# 3. runs the kernel's GPU tests (pytest -m gpu: tests/test_cudnn_kernel.py, the cudnn
#    cases of tests/test_kernels.py, then tests/test_cudnn_usp.py; no megatron-core
#    needed), within TESTS_TIMEOUT_S (default 250);
# 4. runs benchmarks/bench_cudnn.py within BENCH_BUDGET_S (default 170) of measuring.
#
# Everything goes to OUT (default runs/gpu_cudnn): versions.txt, pytest_gpu.log,
# bench_cudnn.log, bench_cudnn.json. A failing step does not stop the next; the exit
# status is 1 if any failed. About 8 minutes at most.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT=${OUT:-$PWD/runs/gpu_cudnn}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed"; status=1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no wheel in .whl/: the cudnn kernel needs nvidia-cudnn-frontend (pip install 'usp_megatron[cudnn]')"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi -L
  python3 - <<'EOF'
import sys

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| torch's cuDNN", torch.backends.cudnn.version(), "| GPUs", torch.cuda.device_count(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import cudnn

    print("cuDNN frontend", cudnn.__version__, "at", cudnn.__file__, "| its cuDNN backend",
          cudnn.backend_version_string())
except Exception as error:  # the tests and the benchmark report what follows from it
    print("cuDNN frontend not usable:", type(error).__name__, error)
from usp_megatron.kernels import available_backends

print("available backends (cuda, bf16):", available_backends("cuda", torch.bfloat16))
EOF
} 2>&1 | tee "$OUT/versions.txt"

echo "== GPU tests of the cudnn kernel ($SECONDS s in)"
timeout "${TESTS_TIMEOUT_S:-250}" python3 -m pytest -m gpu -v --tb=short -rfE --durations=10 \
  -p no:cacheprovider -k cudnn \
  tests/test_cudnn_kernel.py tests/test_kernels.py tests/test_cudnn_usp.py \
  2>&1 | tee "$OUT/pytest_gpu.log"
((PIPESTATUS[0] == 0)) || status=1

echo "== benchmark ($SECONDS s in)"
timeout $((${BENCH_BUDGET_S:-170} + 120)) python3 benchmarks/bench_cudnn.py --out "$OUT" \
  --budget-s "${BENCH_BUDGET_S:-170}" 2>&1 | tee "$OUT/bench_cudnn.log"
((PIPESTATUS[0] == 0)) || status=1

echo "== done in $SECONDS s, status $status"
exit $status
