#!/usr/bin/env bash
# 8 GPUs of one node: USP U4 x R2 (context-parallel size 8): the all-to-all over 4 GPUs,
# the ring over 2. bf16, 64k tokens. DATA / VOCAB as in run_gpu_4_u2r2.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=(); [[ -n "${DATA:-}" ]] && data=(--data-path "$DATA" ${VOCAB:+--vocab-size "$VOCAB"})
torchrun --standalone --nproc-per-node 8 examples/pretrain_gpt/pretrain_gpt.py \
    --usp-ulysses-degree 4 --usp-ring-degree 2 --usp-ring-impl zigzag \
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --num-query-groups 4 \
    --seq-length 65536 --micro-batch-size 1 --global-batch-size 4 --bf16 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 50 --train-iters 500 \
    --save runs/u4r2 --save-interval 250 "${data[@]}" "$@"
