#!/usr/bin/env bash
# 16 GPUs on 2 nodes of 8. Default: USP U8 x R2, the all-to-all inside each node, the ring
# between the nodes. With TP=2: TP2 x U4 x R2 (TP and the ulysses group stay inside a
# node: Megatron orders ranks TP first, then context parallel). bf16, 128k tokens.
# --usp-ulysses-degree auto picks exactly these from the context-parallel size 16 / TP,
# the heads per TP rank and torchrun's 8 processes per node (rank 0 logs the choice).
# Run on each node:  NODE_RANK=0|1 MASTER_ADDR=<node 0> bash run_gpu_16_2nodes.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
tp=${TP:-1}
data=(); [[ -n "${DATA:-}" ]] && data=(--data-path "$DATA" ${VOCAB:+--vocab-size "$VOCAB"})
torchrun --nnodes 2 --nproc-per-node 8 --node-rank "${NODE_RANK:?set NODE_RANK}" \
    --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}" \
    examples/pretrain_gpt/pretrain_gpt.py \
    --tensor-model-parallel-size "$tp" \
    --context-parallel-size $((16 / tp)) --usp-ulysses-degree auto --usp-ring-impl zigzag \
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --num-query-groups 8 \
    --seq-length 131072 --micro-batch-size 1 --global-batch-size 4 --bf16 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 50 --train-iters 500 \
    --save runs/2nodes --save-interval 250 "${data[@]}" "$@"
