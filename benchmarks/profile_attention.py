#!/usr/bin/env python3
"""Where the time of one USP attention step goes, on the GPUs of one host.

    torchrun --nproc-per-node N benchmarks/profile_attention.py [--seq-len 32768] [--out DIR]

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
benchmark itself (speed against the peers) is ``bench_attention.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench_attention import time_steps  # noqa: E402

from usp_megatron import LongContextAttention, init_usp_groups  # noqa: E402
from usp_megatron.kernels import get_kernel  # noqa: E402
from usp_megatron.mask import CAUSAL  # noqa: E402


def median_ms(args: argparse.Namespace, step: Callable[[], object], iters: int | None = None
              ) -> float:
    """Median milliseconds of ``iters`` (default ``--iters``) calls after ``--warmup``,
    timed as the benchmark times them (CUDA events; the host clock on CPU)."""
    times = time_steps(step, args.warmup, iters or args.iters, args.torch_device, True)
    return statistics.median(times)


def world_max(args: argparse.Namespace, value: float) -> float:
    t = torch.tensor([value], device=args.torch_device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def randn(args: argparse.Namespace, *shape: int, grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, device=args.torch_device, dtype=args.torch_dtype)
    return x.requires_grad_(grad)


def kernel_floor(args: argparse.Namespace, heads_list: list[int]) -> list[dict]:
    """fwd+bwd of one kernel call on each GPU at once (the same work on every rank)."""
    rows = []
    s, d = args.seq_len, args.head_dim
    for backend in args.backends:
        kernel = get_kernel(backend, args.torch_device, args.torch_dtype)
        for heads in heads_list:
            q, k, v, dout = (randn(args, 1, s, heads, d) for _ in range(4))

            def ours(q=q, k=k, v=v, dout=dout, kernel=kernel):
                out, lse = kernel.forward(q, k, v, CAUSAL, d**-0.5)
                return kernel.backward(dout, q, k, v, out, lse, CAUSAL, d**-0.5)

            ms = world_max(args, median_ms(args, ours))
            rows.append(dict(part="kernel", backend=backend, layout="bshd", heads=heads, ms=ms))
        del q, k, v, dout
    if args.torch_device.type != "cuda":
        return rows
    for heads in heads_list:  # the one-GPU baseline's own call: SDPA on contiguous bhsd
        q, k, v = (randn(args, 1, heads, s, d, grad=True) for _ in range(3))
        dout = randn(args, 1, heads, s, d)

        def sdpa(q=q, k=k, v=v, dout=dout):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(dout)

        ms = world_max(args, median_ms(args, sdpa))
        rows.append(dict(part="kernel", backend="sdpa_cudnn", layout="bhsd", heads=heads, ms=ms))
        del q, k, v, dout
    return rows


def all_to_all_bandwidth(args: argparse.Namespace) -> list[dict]:
    rows = []
    world = dist.get_world_size()
    local_mib = args.seq_len // world * args.heads * args.head_dim * 2 / 2**20  # one of q/k/v
    for tensors in (1, 3):
        for chunks in (1, 2):
            mib = local_mib * tensors / chunks
            send = randn(args, int(mib * 2**20) // 2)
            recv = torch.empty_like(send)
            ms = world_max(args, median_ms(args, lambda s=send, r=recv:
                                           dist.all_to_all_single(r, s)))
            moved = mib * (world - 1) / world / 1024  # GiB leaving each rank
            rows.append(dict(part="all_to_all", tensors=tensors, chunks=chunks, mib=mib, ms=ms,
                             gib_per_s=moved / (ms / 1e3)))
    return rows


def copy_bandwidth(args: argparse.Namespace) -> list[dict]:
    """The all-to-all's pack copy ([b, s, U, h, d] -> [U, s, b, h, d]) as bf16 and as words."""
    from usp_megatron.tensors import copy_words_

    world = dist.get_world_size()
    s, h, d = args.seq_len // world, args.heads // world, args.head_dim
    src = randn(args, 1, s, world, h, d)
    dst = torch.empty(world, s, 1, h, d, device=args.torch_device, dtype=args.torch_dtype)
    view = src.permute(2, 1, 0, 3, 4)
    rows = []
    for name, fn in (("bf16 copy_", lambda: dst.copy_(view)),
                     ("int64 words", lambda: copy_words_(dst, view)),
                     ("contiguous copy", lambda: dst.copy_(src.view(dst.shape)))):
        ms = world_max(args, median_ms(args, fn))
        gb = 2 * src.numel() * src.element_size() / 1e9
        rows.append(dict(part="copy", kind=name, mib=gb / 2 * 1e9 / 2**20, ms=ms,
                         tb_per_s=gb / ms))
    return rows


def usp_step(args: argparse.Namespace, u: int, r: int, chunks: int, backend: str):
    world = dist.get_world_size()
    groups = init_usp_groups(u, r)
    attn = LongContextAttention(groups, ring_impl=args.impl, backend=backend, head_chunks=chunks)
    s_local, h, d = args.seq_len // world, args.heads, args.head_dim
    q, k, v = (randn(args, 1, s_local, h, d, grad=True) for _ in range(3))
    dout = randn(args, 1, s_local, h, d)

    def step():
        for x in (q, k, v):
            x.grad = None
        attn(q, k, v, causal=True).backward(dout)

    return step


def variants(args: argparse.Namespace) -> list[dict]:
    rows = []
    for u, r in args.configs:
        for backend in args.backends:
            for chunks in args.chunks:
                step = usp_step(args, u, r, chunks, backend)
                try:
                    ms = world_max(args, median_ms(args, step))
                except ValueError as exc:  # chunks that do not divide the heads
                    ms = float("nan")
                    if dist.get_rank() == 0:
                        print(f"  {u}x{r} chunks={chunks}: {exc}")
                rows.append(dict(part="usp", config=f"U{u}R{r}", backend=backend,
                                 chunks=chunks, ms=ms))
                del step
                torch.cuda.empty_cache()
    return rows


def kernel_kind(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if any(key in low for key in ("fmha", "flash", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(key in low for key in ("copy", "cat", "elementwise", "memcpy", "memset", "fill")):
        return "copy/elementwise"
    return "other"


def profile(args: argparse.Namespace, out_dir: Path) -> list[dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows = []
    for u, r in args.trace:
        step = usp_step(args, u, r, args.chunks[0], args.backends[0])
        median_ms(args, step, 2)
        cuda = args.torch_device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                step()
            if cuda:
                torch.cuda.synchronize()
        dist.barrier()
        if dist.get_rank() != 0:
            continue
        by_kind: dict[str, float] = defaultdict(float)
        by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for evt in prof.key_averages():
            device_us = getattr(evt, "self_device_time_total", None)
            if device_us is None:
                device_us = evt.self_cuda_time_total
            kernel = evt.device_type == torch.autograd.DeviceType.CUDA
            if cuda and not kernel:
                continue
            if not cuda:  # CPU: the top-level ops' host time, to check the script runs
                device_us = evt.self_cpu_time_total
            if device_us <= 0:
                continue
            by_kind[kernel_kind(evt.key)] += device_us / 2e3  # ms per step
            by_name[evt.key][0] += evt.count / 2
            by_name[evt.key][1] += device_us / 2e3
        top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]
        rows.append(dict(part="profile", config=f"U{u}R{r}", by_kind=dict(by_kind),
                         where="rank 0's GPU" if cuda else "rank 0's host",
                         top=[dict(name=n[:110], calls=c, ms=ms) for n, (c, ms) in top]))
        trace = out_dir / f"trace_U{u}R{r}.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            dst.write(src.read())
        trace.unlink()
        del step
        torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        if row["part"] == "profile":
            print(f"-- profile {row['config']} ({row['where']}, ms per step by kind): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["by_kind"].items())))
            for t in row["top"]:
                print(f"   {t['ms']:8.3f} ms  {t['calls']:6.1f} calls  {t['name']}")
        else:
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
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
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: gloo, float32, a smoke run of the script (timings meaningless)")
    p.add_argument("--out", default=os.environ.get("OUT") or "profile_out")
    args = p.parse_args(argv)
    args.torch_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.backends = args.backends.split(",")
    args.chunks = [int(c) for c in args.chunks.split(",")]
    args.parts = args.parts.split(",")
    return args


def parse_configs(text: str | None, world: int) -> list[tuple[int, int]]:
    if not text:
        return [(u, world // u) for u in range(world, 0, -1) if world % u == 0]
    pairs = [tuple(int(x) for x in c.lower().split("x")) for c in text.split(",")]
    bad = [f"{u}x{r}" for u, r in pairs if u * r != world]
    if bad:
        raise SystemExit(f"configs {bad} do not multiply to the world size {world}")
    return pairs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        args.torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(args.torch_device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=300),
                                device_id=args.torch_device)
    else:
        args.torch_device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    world = dist.get_world_size()
    args.configs = parse_configs(args.configs, world)
    args.trace = parse_configs(args.trace, world) if args.trace else args.configs
    out_dir = Path(args.out)
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"{name} x {world}, torch {torch.__version__}, "
              f"S={args.seq_len} heads={args.heads} d={args.head_dim} impl={args.impl}")
    heads = sorted({args.heads // (u * c) for u, _ in args.configs for c in (1, 2)}
                   | {args.heads}, reverse=True)
    parts = {"kernel": lambda: kernel_floor(args, heads), "copy": lambda: copy_bandwidth(args),
             "all_to_all": lambda: all_to_all_bandwidth(args),
             "usp": lambda: variants(args), "profile": lambda: profile(args, out_dir)}
    rows: list[dict] = []
    for name in args.parts:
        new = parts[name]()
        rows += new
        if dist.get_rank() == 0:
            print(f"== {name}")
            print_rows(new)
            (out_dir / "profile.json").write_text(json.dumps(rows, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
