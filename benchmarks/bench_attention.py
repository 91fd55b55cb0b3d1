#!/usr/bin/env python3
"""USP attention against PyTorch's context parallel and YunChang, on the GPUs of one host.

    torchrun --nproc-per-node N benchmarks/bench_attention.py [--seqlens 32K,64K] [--out DIR]
    python benchmarks/bench_attention.py --replot DIR/bench.json   # tables and plot again

docs/benchmark_method.md says how to run it and what each column means. This script reads
the arguments; the parts are in ``attnbench/`` (the sweep and its guards: ``sweep.py``; the
methods compared: ``peers.py``; table, JSON and plot: ``report.py``).
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

from attnbench import configs, report  # noqa: E402
from attnbench.flops import FLOP_CONVENTION  # noqa: E402
from attnbench.peers import NOT_BY_DEFAULT, SDPA_BACKENDS, default_usp_backends  # noqa: E402
from attnbench.sweep import Sweep, plan_methods  # noqa: E402
from attnbench.world import join_world  # noqa: E402

from usp_megatron.kernels import BACKENDS  # noqa: E402
from usp_megatron.layout import LAYOUT_NAMES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--seqlens", default="32768,65536,131072", help="total sequence lengths (32K = 32768)"
    )
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--configs", default=None, help="UxR list (default: every factorisation of N)")
    p.add_argument("--impls", default=",".join(LAYOUT_NAMES), help="ring impls (ours and YunChang)")
    p.add_argument(
        "--backends",
        default=None,
        help="our kernel backends, or 'none' (default: those present here, less "
        + ", ".join(sorted(NOT_BY_DEFAULT))
        + ")",
    )
    p.add_argument("--peers", default="torch_cp,yunchang", help="torch_cp, yunchang, or 'none'")
    p.add_argument(
        "--torch-cp-backends",
        default=None,
        help="SDPA backends for PyTorch CP (default cudnn,flash; CPU: default)",
    )
    p.add_argument("--torch-cp-rotate", default="allgather", choices=("allgather", "alltoall"))
    p.add_argument(
        "--yunchang-attn",
        default=None,
        help="YunChang attn_type values (default torch_flash; CPU: torch_math)",
    )
    p.add_argument(
        "--ref-backends",
        default=None,
        help="one-GPU SDPA backends, the first that runs wins (default cudnn,flash; CPU: default)",
    )
    p.add_argument(
        "--gqa",
        default="off",
        choices=("off", "on", "both"),
        help=f"on: kv heads = heads/{configs.GQA_RATIO}; both: MHA and GQA",
    )
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="default bfloat16 (CPU: float32)",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=("cuda", "cpu"),
        help="cuda with NCCL, or cpu with gloo for a smoke run (default: cuda if present)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="start no case after this many seconds (the default keeps a run under 10 minutes)",
    )
    p.add_argument("--nccl-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=os.environ.get("RESULTS_DIR") or os.environ.get("OUT") or "bench_out",
        help="output folder; $RESULTS_DIR, when set, is the default",
    )
    a = p.parse_args(argv)

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = a.device == "cpu"
    a.dtype = a.dtype or ("float32" if cpu else "bfloat16")
    a.modes = configs.csv(a.modes)
    a.impls = configs.csv(a.impls)
    a.peers = [] if a.peers == "none" else configs.csv(a.peers)
    a.torch_cp_backends = configs.csv(a.torch_cp_backends or ("default" if cpu else "cudnn,flash"))
    a.yunchang_attn = configs.csv(a.yunchang_attn or ("torch_math" if cpu else "torch_flash"))
    a.ref_backends = configs.csv(a.ref_backends or ("default" if cpu else "cudnn,flash"))
    a.torch_device = torch.device(a.device)
    a.torch_dtype = getattr(torch, a.dtype)
    if a.backends is None:
        a.backends = default_usp_backends(a.torch_device, a.torch_dtype)
    else:
        a.backends = [] if a.backends == "none" else configs.csv(a.backends)
    sdpa_names = (*SDPA_BACKENDS, "default")
    try:
        a.seqlens = configs.parse_seq_lens(a.seqlens)
        a.kv_heads = configs.kv_head_counts(a.heads, a.gqa)
        for flag, values, allowed in (
            ("--modes", a.modes, configs.MODES),
            ("--impls", a.impls, LAYOUT_NAMES),
            ("--backends", a.backends, BACKENDS),
            ("--peers", a.peers, ("torch_cp", "yunchang")),
            ("--torch-cp-backends", a.torch_cp_backends, sdpa_names),
            ("--ref-backends", a.ref_backends, sdpa_names),
        ):
            configs.check_choices(flag, values, allowed)
    except ValueError as exc:
        p.error(str(exc))
    return a


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--replot":
        report.replot(Path(sys.argv[2]))
        return
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it
    try:
        methods = plan_methods(args, world)  # bad --configs fail here, before any group
    except ValueError as exc:
        sys.exit(f"bench_attention: {exc}")
    args.torch_device = join_world(args.device, args.nccl_timeout_s)
    try:
        sweep = Sweep(args)
        sweep.log(
            f"{len(methods)} cases x {len(args.modes)} modes x {len(args.seqlens)} lengths x "
            f"{len(args.kv_heads)} head layouts on {dist.get_world_size()} ranks; "
            f"FLOPs: {FLOP_CONVENTION}"
        )
        sweep.log("settings: " + json.dumps(sweep.meta()["settings"]))
        sweep.run(methods)
        sweep.finish()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
