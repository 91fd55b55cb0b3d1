#!/usr/bin/env bash
# Build a flash-attn wheel from its sdist, offline, pruned to what this project runs on
# H100/H200: sm90 only, bf16 only, head dims 64 and 128 (12 kernel files instead of 72;
# about 8 minutes with 12 jobs on a 16-core H100 machine, a 51 MB library).
#
#   tools/build_flash_attn.sh SDIST OUT_DIR
#
# SDIST: flash_attn-<ver>.tar.gz, fetched beforehand on a machine with PyPI access (nothing
# fetched is committed; carry it in a git-ignored wheels/ directory):
#   FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: \
#       --no-build-isolation flash-attn==2.8.3 -d wheels/
# (flash-attn's setup.py imports torch: --no-build-isolation lets it use the installed one,
# and the skip variable keeps it from looking for nvcc just to read the metadata).
# OUT_DIR receives flash_attn-<ver>-*.whl; install it with pip install OUT_DIR/flash_attn-*.whl.
#
# Needs on the build machine: nvcc (CUDA >= 11.8, found through CUDA_HOME or PATH), the torch
# the wheel will run with, and ninja, packaging, psutil, wheel, setuptools (no network use).
# Environment: MAX_JOBS (default 12), PYTHON (default python3), PRUNE_ONLY=1 to stop after
# pruning and list the kernel files that would be built (works without CUDA).
#
# How, read from flash-attn 2.8.3's setup.py: FLASH_ATTN_CUDA_ARCHS picks the -gencode
# targets ("90": sm_90 only); FLASH_ATTENTION_FORCE_BUILD=TRUE skips its attempt to download
# a prebuilt wheel; MAX_JOBS bounds ninja's jobs. The kernel files are a fixed list in
# setup.py, and flash_api.cpp's FP16_SWITCH / HEADDIM_SWITCH (csrc/flash_attn/src/
# static_switch.h) instantiate every dtype and head dim, so the unpacked copy is edited: the
# fp16 files and those of head dims 32, 96, 192, 256 leave the list, and the switches keep
# bf16 and head dims 33-64 / 97-128 (anything else raises a clear error at call time).
set -euo pipefail

if [[ $# -ne 2 ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
sdist=$(realpath "$1")
mkdir -p "$2"
out=$(realpath "$2")
python=${PYTHON:-python3}
[[ -f $sdist ]] || { echo "no sdist at $sdist" >&2; exit 1; }

work=$(mktemp -d /tmp/flash_attn_build.XXXXXX)
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'flash_attn-*' | head -n 1)
[[ -n $src && -f $src/setup.py ]] || { echo "$sdist holds no flash_attn-*/setup.py" >&2; exit 1; }
switch=$src/csrc/flash_attn/src/static_switch.h

# The kernel list: keep bf16 files of head dims 64 and 128.
"$python" - "$src/setup.py" <<'PY'
import re
import sys

path = sys.argv[1]
lines = open(path).read().split("\n")
kernel = re.compile(r'^\s*"csrc/flash_attn/src/flash_\w+\.cu",\s*$')
keep = re.compile(r"hdim(64|128)_bf16")
kept = [line for line in lines if not kernel.match(line) or keep.search(line)]
dropped = len(lines) - len(kept)
if dropped == 0 or not any(kernel.match(line) for line in kept):
    sys.exit(f"{path}: no kernel list of the expected form; this script knows flash-attn 2.8")
open(path, "w").write("\n".join(kept))
print(f"setup.py: {dropped} kernel files dropped")
PY

# The dispatch: bf16 only, head dims 64 and 128 only.
"$python" - "$switch" <<'PY'
import re
import sys

path = sys.argv[1]
text = open(path).read()
fp16 = r"""#define FP16_SWITCH(COND, ...)                                                   \
  [&] {                                                                          \
    TORCH_CHECK(!(COND), "this flash-attn build has bf16 kernels only");         \
    using elem_type = cutlass::bfloat16_t;                                       \
    return __VA_ARGS__();                                                        \
  }()
"""
headdim = r"""#define HEADDIM_SWITCH(HEADDIM, ...)                                             \
  [&] {                                                                          \
    TORCH_CHECK((HEADDIM > 32 && HEADDIM <= 64) || (HEADDIM > 96 && HEADDIM <= 128), \
                "this flash-attn build has head dims 64 and 128 only");          \
    if (HEADDIM <= 64) {                                                         \
      constexpr static int kHeadDim = 64;                                        \
      return __VA_ARGS__();                                                      \
    } else {                                                                     \
      constexpr static int kHeadDim = 128;                                       \
      return __VA_ARGS__();                                                      \
    }                                                                            \
  }()
"""
for name, new in (("FP16_SWITCH", fp16), ("HEADDIM_SWITCH", headdim)):
    pattern = re.compile(r"#define " + name + r"\(.*?\n  \}\(\)\n", re.S)
    text, count = pattern.subn(lambda _: new, text)
    if count != 1:
        sys.exit(f"{path}: no {name} of the expected form; this script knows flash-attn 2.8")
open(path, "w").write(text)
print("static_switch.h: bf16, head dims 64 and 128")
PY

if [[ ${PRUNE_ONLY:-0} == 1 ]]; then
    grep -o 'csrc/flash_attn/src/flash_[a-z0-9_]*\.cu' "$src/setup.py"
    exit 0
fi

command -v nvcc >/dev/null || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]] \
    || { echo "no nvcc on PATH or in CUDA_HOME: flash-attn builds on a machine with the CUDA toolkit" >&2; exit 1; }
cd "$src"
FLASH_ATTN_CUDA_ARCHS=90 FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-12} \
    "$python" -m pip wheel --no-build-isolation --no-deps --no-index -w "$out" .
ls -l "$out"/flash_attn-*.whl
