#!/usr/bin/env python3
"""Where the time of one USP attention step goes, on the GPUs of one host.

    torchrun --nproc-per-node N benchmarks/profile_attention.py [--seq-len 32K] [--out DIR]

Four parts, each printed as a table on rank 0 and written to ``DIR/profile.json``:

0. copy: the all-to-all's permuted pack copy, element-wise and as 8-byte words.
1. kernel floor: one GPU, the attention kernel alone (fwd+bwd) at the full sequence for
   the head counts a rank runs (all heads, heads / U, heads / (U * chunks)): ``N`` times
   the per-rank time against ``T_1`` says how much of the gap is the kernel itself.
2. all-to-all: ``all_to_all_single`` over the world for the buffer sizes USP sends.
3. variants: USP fwd+bwd for each ``U x R`` and head-chunk count, median of ``--iters``.
4. profile: ``torch.profiler`` over two steps of each ``--trace`` config (the first of
   ``--chunks``): time per kernel
   kind (attention, NCCL, copies, other) on rank 0's GPU, and a Chrome trace per config.

This is the tool behind the "where the time goes" notes in docs/benchmarks.md; the
benchmark itself (speed against the peers) is ``bench_attention.py``. The parts are in
``attnbench/profiling.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from attnbench import configs  # noqa: E402
from attnbench.profiling import PARTS, print_rows, run_part  # noqa: E402
from attnbench.world import join_world  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", default="32768", help="total sequence length (32K = 32768)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--impl", default="zigzag")
    p.add_argument("--backends", default="torch_cudnn")
    p.add_argument("--configs", default=None, help="UxR list (default: every factorisation)")
    p.add_argument("--chunks", default="1,2", help="head chunks to try")
    p.add_argument("--trace", default=None, help="UxR configs to profile (default: --configs)")
    p.add_argument("--parts", default="kernel,all_to_all,usp,profile")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: gloo, float32, a smoke run of the script (timings meaningless)",
    )
    p.add_argument(
        "--out",
        default=os.environ.get("RESULTS_DIR") or os.environ.get("OUT") or "profile_out",
        help="output folder (default: $RESULTS_DIR, else profile_out)",
    )
    args = p.parse_args(argv)
    args.torch_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.backends = args.backends.split(",")
    args.chunks = [int(c) for c in args.chunks.split(",")]
    args.parts = args.parts.split(",")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it
    try:
        args.seq_len = configs.parse_seq_len(args.seq_len, "--seq-len")
        configs.check_choices("--parts", args.parts, PARTS)
        # Largest U first when not given (the profiler's order since it was written).
        args.configs = (
            configs.parse_configs(args.configs, world)
            if args.configs
            else configs.factorizations(world)[::-1]
        )
        args.trace = (
            configs.parse_configs(args.trace, world, "--trace") if args.trace else args.configs
        )
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.torch_device = join_world(args.device, timeout_s=300)
    world = dist.get_world_size()
    out_dir = Path(args.out)
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(
            f"{name} x {world}, torch {torch.__version__}, "
            f"S={args.seq_len} heads={args.heads} d={args.head_dim} impl={args.impl}"
        )
    rows: list[dict] = []
    for name in args.parts:
        new = run_part(name, args, out_dir)
        rows += new
        if dist.get_rank() == 0:
            print(f"== {name}")
            print_rows(new)
            (out_dir / "profile.json").write_text(json.dumps(rows, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
