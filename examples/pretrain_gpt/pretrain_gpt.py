"""GPT pretraining with USP on megatron-core alone.

    torchrun --nproc-per-node 4 examples/pretrain_gpt/pretrain_gpt.py \
        --usp-ulysses-degree 2 --usp-ring-degree 2

Runs on GPUs (NCCL) or, without them, on CPU processes (gloo, through the plugin's CPU
shim). Without ``--data-path`` it trains on the embedded pydoc corpus.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the summary's wall time includes the imports below

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# Megatron warns about missing optional packages on import; rank 0 keeps them.
if os.environ.get("RANK", "0") != "0":
    warnings.filterwarnings("ignore")

from arguments import parse_args  # noqa: E402
from checkpoint import CheckpointError  # noqa: E402
from preflight import ConfigError, check_configuration  # noqa: E402
from report import banner, summary  # noqa: E402
from training import train, use_cuda  # noqa: E402

from usp_megatron.megatron.launch import exit_refused  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Train; a refused configuration (a flag argparse refuses included) is one message from
    rank 0 and exit 1 on every rank."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        args = parse_args(argv)
        if "RANK" not in os.environ:
            sys.exit("launch with torchrun, e.g. torchrun --nproc-per-node 4 " + sys.argv[0])
        plan = check_configuration(args, int(os.environ["WORLD_SIZE"]))
        if rank == 0:
            print(banner(args, plan), flush=True)
        history = _run(args)
    except (ConfigError, CheckpointError) as error:  # the latter: found only while loading
        exit_refused(f"{Path(sys.argv[0]).name}: {error}")
    if rank == 0 and history:
        print(summary(args, plan, history, time.perf_counter() - STARTED), flush=True)
    return 0


def _run(args: argparse.Namespace) -> list[dict]:
    cuda = use_cuda(args)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    try:
        history = train(args)
        if args.history_json and history and dist.get_rank() == 0:
            Path(args.history_json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.history_json, "w") as f:
                json.dump({"args": vars(args), "history": history}, f, indent=1)
        dist.barrier()  # no rank closes its connections while another finishes a collective
        return history
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
