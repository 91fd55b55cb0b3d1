"""GPT pretraining with USP on megatron-core alone.

    torchrun --nproc-per-node 4 examples/pretrain_gpt/pretrain_gpt.py \
        --usp-ulysses-degree 2 --usp-ring-degree 2

Runs on GPUs (NCCL) or, without them, on CPU processes (gloo, through the plugin's CPU
shim). Without ``--data-path`` it trains on the embedded pydoc corpus.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

# Megatron warns about missing optional packages on import; rank 0 keeps them.
if os.environ.get("RANK", "0") != "0":
    warnings.filterwarnings("ignore")

from arguments import parse_args  # noqa: E402
from training import train, use_cuda  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("launch with torchrun, e.g. torchrun --nproc-per-node 4 " + sys.argv[0])
    cuda = use_cuda(args)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    try:
        history = train(args)
        if args.history_json and dist.get_rank() == 0:
            with open(args.history_json, "w") as f:
                json.dump({"args": vars(args), "history": history}, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
