#!/usr/bin/env bash
# 4 GPUs of one node: USP U2 x R2 (context-parallel size 4), bf16, a 1.3B-class GPT at
# 32k tokens. DATA=prefix of a Megatron .bin/.idx (byte-level by default, or set
# VOCAB=50304 for GPT-2 tokens); without it, the embedded pydoc corpus.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=(); [[ -n "${DATA:-}" ]] && data=(--data-path "$DATA" ${VOCAB:+--vocab-size "$VOCAB"})
torchrun --standalone --nproc-per-node 4 examples/pretrain_gpt/pretrain_gpt.py \
    --usp-ulysses-degree 2 --usp-ring-degree 2 --usp-ring-impl zigzag \
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --num-query-groups 8 \
    --seq-length 32768 --micro-batch-size 1 --global-batch-size 4 --bf16 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 50 --train-iters 500 \
    --save runs/u2r2 --save-interval 250 "${data[@]}" "$@"
