"""The profiler's parts: where the time of one USP attention step goes.

Each part returns rows (dicts with ``part``), timed as the benchmark times (``timing``)
and maxed over ranks; ``profile_attention.py`` chooses the parts and writes the rows.
"""

from __future__ import annotations

import argparse
import gzip
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from usp_megatron import LongContextAttention, init_usp_groups
from usp_megatron.kernels import get_kernel
from usp_megatron.mask import CAUSAL

from .timing import median_ms, world_max


def _timed(args: argparse.Namespace, step: Callable[[], object]) -> float:
    """Median ms of ``--iters`` calls after ``--warmup`` on each rank, max over ranks."""
    device = args.torch_device
    return world_max(median_ms(step, args.warmup, args.iters, device), device)


def randn(args: argparse.Namespace, *shape: int, grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, device=args.torch_device, dtype=args.torch_dtype)
    return x.requires_grad_(grad)


def kernel_floor_heads(heads: int, configs: list[tuple[int, int]]) -> list[int]:
    """The head counts a rank runs: all, heads / U, heads / (2U) (two head chunks)."""
    return sorted({heads // (u * c) for u, _ in configs for c in (1, 2)} | {heads}, reverse=True)


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

            ms = _timed(args, ours)
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

        ms = _timed(args, sdpa)
        rows.append(dict(part="kernel", backend="sdpa_cudnn", layout="bhsd", heads=heads, ms=ms))
        del q, k, v, dout
    return rows


def all_to_all_bandwidth(args: argparse.Namespace) -> list[dict]:
    """``all_to_all_single`` over the world for one and three of q/k/v, whole or halved."""
    rows = []
    world = dist.get_world_size()
    local_mib = args.seq_len // world * args.heads * args.head_dim * 2 / 2**20  # one of q/k/v
    for tensors in (1, 3):
        for chunks in (1, 2):
            mib = local_mib * tensors / chunks
            send = randn(args, int(mib * 2**20) // 2)
            recv = torch.empty_like(send)
            ms = _timed(args, lambda s=send, r=recv: dist.all_to_all_single(r, s))
            moved = mib * (world - 1) / world / 1024  # GiB leaving each rank
            rows.append(
                dict(
                    part="all_to_all",
                    tensors=tensors,
                    chunks=chunks,
                    mib=mib,
                    ms=ms,
                    gib_per_s=moved / (ms / 1e3),
                )
            )
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
    for name, fn in (
        ("bf16 copy_", lambda: dst.copy_(view)),
        ("int64 words", lambda: copy_words_(dst, view)),
        ("contiguous copy", lambda: dst.copy_(src.view(dst.shape))),
    ):
        ms = _timed(args, fn)
        gb = 2 * src.numel() * src.element_size() / 1e9
        rows.append(dict(part="copy", kind=name, mib=gb / 2 * 1e9 / 2**20, ms=ms, tb_per_s=gb / ms))
    return rows


def usp_step(
    args: argparse.Namespace, u: int, r: int, chunks: int, backend: str
) -> Callable[[], None]:
    """One USP fwd+bwd on this rank's random shard ``[1, S/N, h, d]``."""
    world = dist.get_world_size()
    groups = init_usp_groups(u, r)
    attn = LongContextAttention(groups, layout=args.impl, backend=backend, head_chunks=chunks)
    s_local, h, d = args.seq_len // world, args.heads, args.head_dim
    q, k, v = (randn(args, 1, s_local, h, d, grad=True) for _ in range(3))
    dout = randn(args, 1, s_local, h, d)

    def step():
        for x in (q, k, v):
            x.grad = None
        attn(q, k, v, causal=True).backward(dout)

    return step


def variants(args: argparse.Namespace) -> list[dict]:
    """USP fwd+bwd for each ``--configs`` x ``--backends`` x ``--chunks``."""
    rows = []
    for u, r in args.configs:
        for backend in args.backends:
            for chunks in args.chunks:
                step = usp_step(args, u, r, chunks, backend)
                try:
                    ms = _timed(args, step)
                except ValueError as exc:  # chunks that do not divide the heads
                    ms = float("nan")
                    if dist.get_rank() == 0:
                        print(f"  {u}x{r} chunks={chunks}: {exc}")
                rows.append(
                    dict(part="usp", config=f"U{u}R{r}", backend=backend, chunks=chunks, ms=ms)
                )
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
    """``torch.profiler`` over two steps of each ``--trace`` config: time per kernel kind,
    the top kernels on rank 0, and a gzipped Chrome trace per config."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows = []
    for u, r in args.trace:
        step = usp_step(args, u, r, args.chunks[0], args.backends[0])
        median_ms(step, args.warmup, 2, args.torch_device)
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
        rows.append(
            dict(
                part="profile",
                config=f"U{u}R{r}",
                by_kind=dict(by_kind),
                where="rank 0's GPU" if cuda else "rank 0's host",
                top=[dict(name=n[:110], calls=c, ms=ms) for n, (c, ms) in top],
            )
        )
        trace = out_dir / f"trace_U{u}R{r}.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            dst.write(src.read())
        trace.unlink()
        del step
        torch.cuda.empty_cache()
    return rows


PARTS = ("kernel", "copy", "all_to_all", "usp", "profile")


def run_part(name: str, args: argparse.Namespace, out_dir: Path) -> list[dict]:
    """The rows of one of PARTS."""
    if name == "kernel":
        return kernel_floor(args, kernel_floor_heads(args.heads, args.configs))
    if name == "copy":
        return copy_bandwidth(args)
    if name == "all_to_all":
        return all_to_all_bandwidth(args)
    if name == "usp":
        return variants(args)
    if name == "profile":
        return profile(args, out_dir)
    raise ValueError(f"--parts entry {name!r} not in {list(PARTS)}")


def print_rows(rows: list[dict]) -> None:
    """One line per row (``key=value``); a profile row and its top kernels."""
    for row in rows:
        if row["part"] == "profile":
            print(
                f"-- profile {row['config']} ({row['where']}, ms per step by kind): "
                + ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["by_kind"].items()))
            )
            for t in row["top"]:
                print(f"   {t['ms']:8.3f} ms  {t['calls']:6.1f} calls  {t['name']}")
        else:
            print(
                "  ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
