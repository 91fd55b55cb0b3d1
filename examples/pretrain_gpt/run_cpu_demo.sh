#!/usr/bin/env bash
# CPU demo: 4 processes (gloo) train the tiny default GPT with USP U2 x R2 on the embedded
# pydoc corpus. About a minute on 2 cores. Extra flags pass through, e.g.
#   bash examples/pretrain_gpt/run_cpu_demo.sh --usp-ring-impl stripe --train-iters 20
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --standalone --nproc-per-node 4 examples/pretrain_gpt/pretrain_gpt.py \
    --device cpu --usp-ulysses-degree 2 --usp-ring-degree 2 "$@"
