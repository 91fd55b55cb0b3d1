#!/usr/bin/env python3
"""One GPU: the cuDNN-frontend kernel (backend ``cudnn``) against PyTorch's attention ops
and the project's own, and what USP's own call adds on top of it.

    python3 benchmarks/bench_cudnn.py [--out DIR] [--budget-s 240]

Batch 1, 32 query heads of 128, bf16, forward + backward of one block (the kernels'
``forward`` and ``backward``), median of CUDA-event times after warm-up:

- dense causal at 16K..128K tokens: PyTorch's cuDNN SDPA op (``torch_cudnn``), ``cudnn``;
- a causal window of 4096: ``cudnn``, ``torch_window`` (tiles on PyTorch's cuDNN op),
  PyTorch's flash op with a window (``torch_flash``); ratio to dense ``torch_cudnn``;
- packed documents in 16K tokens (300 random lengths; 8 of 2048; 32 and 8 key/value
  heads, causal): ``cudnn`` and PyTorch's varlen flash op; ratio to dense 16K;
- USP: ``LongContextAttention`` at U1 x R1 with backend ``cudnn`` (autograd forward and
  backward) against the bare kernel calls on the same inputs and mask; ratio (the
  target is <= 1.05).

Window and document rows also give the relative difference of their output and dq from
``torch_flash``'s (a kernel with the wrong mask would be fast and wrong). Measurements
start only while ``--budget-s`` lasts (the largest length runs last); the rest are
listed as skipped. One table is printed last; ``<out>/bench_cudnn.json`` holds every
row. ``--device cpu`` runs the script with the plain-torch kernel standing in for every
GPU kernel (float32, give small sizes): a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from usp_megatron import LongContextAttention, init_usp_groups  # noqa: E402
from usp_megatron.kernels import get_kernel  # noqa: E402
from usp_megatron.layout import get_layout  # noqa: E402
from usp_megatron.mask import CAUSAL, BlockMask, Documents  # noqa: E402
from usp_megatron.testing import free_port  # noqa: E402

KERNELS = ("cudnn", "torch_cudnn", "torch_window", "torch_flash")


@dataclasses.dataclass
class Row:
    section: str
    tokens: int
    method: str
    heads: str
    ms: float | None = None
    baseline: str | None = None  # the method of the same section and tokens it is divided by
    ratio: float | None = None
    err_out: float | None = None  # relative difference from torch_flash's output
    err_dq: float | None = None
    note: str = ""


class Bench:
    """Rows, the time budget, and the kernels (or their CPU stand-in)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows = args, []
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.kernels = {name: self._kernel(name) for name in KERNELS}

    def _kernel(self, name: str):
        """The kernel registered as ``name`` (the plain-torch one for all, on CPU)."""
        return get_kernel(name if self.device.type == "cuda" else "reference", self.device,
                          self.dtype)  # fmt: skip

    def inputs(self, tokens: int, kv_heads: int) -> list[torch.Tensor]:
        """q, k, v, dout: [1, tokens, h, d], seeded."""
        gen = torch.Generator(device=self.device).manual_seed(tokens + kv_heads)
        heads, d = self.args.heads, self.args.head_dim
        shapes = [(1, tokens, h, d) for h in (heads, kv_heads, kv_heads, heads)]
        return [torch.randn(s, generator=gen, device=self.device, dtype=self.dtype) for s in shapes]

    def median_ms(self, step: Callable[[], object], iters: int) -> float:
        """Median milliseconds of ``iters`` calls after ``args.warmup`` (CUDA events on GPU)."""
        for _ in range(self.args.warmup):
            step()
        if self.device.type != "cuda":
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]  # fmt: skip
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)

    def has_time(self) -> bool:
        return time.monotonic() < self.deadline

    def measure(self, row: Row, step: Callable[[], object], iters: int) -> Row:
        """Time ``step`` into ``row`` unless the budget is spent; a failure is noted, not
        raised (the other rows still run)."""
        self.rows.append(row)
        if not self.has_time():
            row.note = "skipped: time budget spent"
            return row
        try:
            row.ms = self.median_ms(step, iters)
        except Exception as error:  # noqa: BLE001 - reported in the table, the rest runs on
            row.note = f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
        self.free()
        took = f"{row.ms:.3f} ms" if row.ms is not None else row.note
        print(f"[{time.monotonic() - self.start:6.1f} s] {row.section} | {row.tokens} | "
              f"{row.heads} | {row.method}: {took}", flush=True)  # fmt: skip
        return row

    def free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def iters(self, tokens: int) -> int:
        return self.args.iters if tokens <= 32768 else max(3, self.args.iters // 2)


def kernel_step(kernel, q, k, v, dout, mask, scale) -> Callable[[], tuple]:
    """One forward and backward of ``kernel`` on a block; returns (out, dq)."""

    def step() -> tuple:
        out, lse = kernel.forward(q, k, v, mask, scale)
        return out, kernel.backward(dout, q, k, v, out, lse, mask, scale)[0]

    return step


def agreement(row: Row, step: Callable[[], tuple], reference: Callable[[], tuple]) -> None:
    """``row``'s out and dq against the reference kernel's (relative norm of the difference)."""
    try:
        (out, dq), (want_out, want_dq) = step(), reference()
        row.err_out, row.err_dq = (float((a.float() - b.float()).norm() / b.float().norm())
                                   for a, b in ((out, want_out), (dq, want_dq)))  # fmt: skip
    except Exception as error:  # noqa: BLE001
        row.note = f"check failed: {type(error).__name__}: {str(error).strip()[:120]}"


def dense_and_window(bench: Bench, tokens: int) -> None:
    args, scale = bench.args, bench.args.head_dim**-0.5
    q, k, v, dout = bench.inputs(tokens, args.heads)
    heads = f"{args.heads}/{args.heads}"
    for name in ("torch_cudnn", "cudnn"):
        step = kernel_step(bench.kernels[name], q, k, v, dout, CAUSAL, scale)
        bench.measure(Row("dense causal", tokens, name, heads, baseline="torch_cudnn"), step,
                      bench.iters(tokens))  # fmt: skip
    band = BlockMask(-args.window, 0)
    flash = kernel_step(bench.kernels["torch_flash"], q, k, v, dout, band, scale)
    for name in ("cudnn", "torch_window", "torch_flash"):
        step = kernel_step(bench.kernels[name], q, k, v, dout, band, scale)
        row = Row(f"window {args.window}", tokens, name, heads, baseline="dense torch_cudnn")
        if name != "torch_flash" and tokens == min(args.seqlens) and bench.has_time():
            agreement(row, step, flash)
        bench.measure(row, step, bench.iters(tokens))
    del q, k, v, dout
    bench.free()


def packed_lengths(tokens: int, documents: int, seed: int = 0) -> list[int]:
    """``documents`` random positive lengths adding up to ``tokens`` (seeded cut points)."""
    cuts = sorted(random.Random(seed).sample(range(1, tokens), documents - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]


def packed(bench: Bench) -> None:
    args, scale = bench.args, bench.args.head_dim**-0.5
    tokens = args.packed_tokens
    for kv_heads in (args.heads, args.gqa_kv_heads):
        q, k, v, dout = bench.inputs(tokens, kv_heads)
        heads = f"{args.heads}/{kv_heads}"
        step = kernel_step(bench.kernels["torch_cudnn"], q, k, v, dout, CAUSAL, scale)
        bench.measure(Row("packed documents", tokens, "dense torch_cudnn", heads), step, args.iters)
        packings = {
            f"{args.random_docs} random lengths": packed_lengths(tokens, args.random_docs),
            f"{args.equal_docs} of {tokens // args.equal_docs}":
                [tokens // args.equal_docs] * args.equal_docs,
        }  # fmt: skip
        for packing, lengths in packings.items():
            starts = tuple(sum(lengths[:n]) for n in range(len(lengths)))
            mask = BlockMask(documents=Documents(starts, tuple(lengths), starts, tuple(lengths),
                                                 causal=True))  # fmt: skip
            flash = kernel_step(bench.kernels["torch_flash"], q, k, v, dout, mask, scale)
            for name in ("cudnn", "torch_flash"):
                step = kernel_step(bench.kernels[name], q, k, v, dout, mask, scale)
                row = Row("packed documents", tokens, f"{packing}: {name}", heads,
                          baseline="dense torch_cudnn")  # fmt: skip
                if name == "cudnn" and bench.has_time():
                    agreement(row, step, flash)
                bench.measure(row, step, args.iters)
        del q, k, v, dout
        bench.free()


def usp_overhead(bench: Bench) -> None:
    """USP at U1 x R1 (autograd) against the one bare kernel call it makes, same inputs
    and mask (layout ``basic``: one run per block, so a window is one band; packed
    documents through their prebuilt layout, no host read per call)."""
    args, scale = bench.args, bench.args.head_dim**-0.5
    groups = init_usp_groups(1, 1)
    backend = "cudnn" if bench.device.type == "cuda" else "reference"
    attn = LongContextAttention(groups, layout="basic", backend=backend)
    kernel = bench.kernels["cudnn"]
    for tokens in args.usp_tokens:
        q, k, v, dout = bench.inputs(tokens, args.heads)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        cu = torch.arange(0, tokens + 1, tokens // args.equal_docs, dtype=torch.int32)
        layout = get_layout("zigzag", 1, 1).packed(cu, cu)
        cases = {
            "dense causal": (CAUSAL, {}),
            f"window {args.window}": (
                BlockMask(-args.window, 0),
                {"window_size": (args.window, 0)},
            ),
            f"{args.equal_docs} documents": (
                layout.block_tasks(0, 0, tokens, True)[0].mask,
                {"layout": layout},
            ),
        }
        for case, (mask, call) in cases.items():

            def usp(call=call, leaves=leaves, dout=dout) -> None:
                for x in leaves:
                    x.grad = None
                attn(*leaves, causal=True, **call).backward(dout)

            bare = kernel_step(kernel, q, k, v, dout, mask, scale)
            section = f"USP U1xR1 vs bare: {case}"
            bench.measure(Row(section, tokens, "bare cudnn", f"{args.heads}/{args.heads}"), bare,
                          args.usp_iters)  # fmt: skip
            bench.measure(Row(section, tokens, "USP cudnn", f"{args.heads}/{args.heads}",
                              baseline="bare cudnn"), usp, args.usp_iters)  # fmt: skip
        del q, k, v, dout, leaves
        bench.free()


def fill_ratios(rows: list[Row]) -> None:
    """Each row's ms over its baseline's: the row of that method in the same section and
    length (``dense X``: the dense-causal section's X at that length)."""
    ms = {(r.section, r.tokens, r.method): r.ms for r in rows}
    for r in rows:
        if r.baseline is None or r.ms is None:
            continue
        section, method = r.section, r.baseline
        if method.startswith("dense ") and not r.section.startswith("packed"):
            section, method = "dense causal", method.removeprefix("dense ")
        base = ms.get((section, r.tokens, method))
        r.ratio = r.ms / base if base else None


def table(rows: list[Row], header: str) -> str:
    lines = [header, f"{'section':<34} {'tokens':>7} {'heads':>6} {'method':<34} {'ms':>9} "
                     f"{'ratio':>7} {'vs':<17} {'out err':>8} {'dq err':>8}  note"]  # fmt: skip
    for r in rows:
        ms = f"{r.ms:9.3f}" if r.ms is not None else f"{'-':>9}"
        ratio = f"{r.ratio:7.3f}" if r.ratio is not None else f"{'-':>7}"
        errs = "".join(
            f" {e:8.1e}" if e is not None else f" {'-':>8}" for e in (r.err_out, r.err_dq)
        )
        lines.append(f"{r.section:<34} {r.tokens:>7} {r.heads:>6} {r.method:<34} {ms} {ratio} "
                     f"{r.baseline or '':<17}{errs}  {r.note}")  # fmt: skip
    return "\n".join(lines)


def versions(device: torch.device) -> dict[str, str]:
    """torch, CUDA, and on a GPU its name, torch's cuDNN and the frontend's versions."""
    found = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    if device.type == "cuda":
        from usp_megatron.kernels.cudnn_frontend import frontend_versions

        found.update(gpu=torch.cuda.get_device_name(device),
                     torch_cudnn=str(torch.backends.cudnn.version()))  # fmt: skip
        try:
            found["cudnn"] = frontend_versions()
        except ImportError as error:
            found["cudnn"] = f"no cuDNN frontend ({error})"
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def lengths(text: str) -> list[int]:
        return [int(n) for n in text.split(",") if n]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--seqlens", type=lengths, default=[16384, 32768, 65536, 131072])
    p.add_argument("--window", type=int, default=4096, help="causal window (keys i-W .. i)")
    p.add_argument("--packed-tokens", type=int, default=16384)
    p.add_argument("--random-docs", type=int, default=300, help="documents, random lengths")
    p.add_argument("--equal-docs", type=int, default=8, help="documents, equal lengths")
    p.add_argument("--usp-tokens", type=lengths, default=[16384, 4096])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--gqa-kv-heads", type=int, default=8, help="key/value heads, GQA rows")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--usp-iters", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="runs/bench_cudnn")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.seqlens = sorted(args.seqlens)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cudnn.py measures one CUDA GPU; none is visible here")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=timedelta(seconds=120))  # fmt: skip
    try:
        found = versions(torch.device(args.device))
        print("bench_cudnn:", json.dumps(found), flush=True)
        try:
            bench = Bench(args)
        except ValueError as error:  # a kernel unavailable here: say which, measure nothing
            raise SystemExit(f"bench_cudnn.py: {error}") from None
        for tokens in args.seqlens[:-1]:
            dense_and_window(bench, tokens)
        packed(bench)
        usp_overhead(bench)
        dense_and_window(bench, args.seqlens[-1])  # the longest last: the budget may stop it
    finally:
        dist.destroy_process_group()
    fill_ratios(bench.rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = [
        f"{r.section} {r.tokens} {r.heads} {r.method}"
        for r in bench.rows
        if r.note.startswith("skipped")
    ]
    rows = [dataclasses.asdict(r) for r in bench.rows]
    record = {"versions": found, "args": vars(args), "rows": rows, "skipped": skipped}
    (out / "bench_cudnn.json").write_text(json.dumps(record, indent=1))
    where = found.get("gpu", "CPU (a smoke run: the plain-torch kernel everywhere)")
    header = (
        f"\ncuDNN frontend kernel vs PyTorch's ops, one {where} ({found.get('cudnn', 'no cudnn')}, "
        f"torch {found['torch']}); b=1, {bench.dtype}, fwd+bwd, head dim {args.head_dim}, "
        "median; ratio = ms / the row named in 'vs' (same section and tokens)"
    )
    print(table(bench.rows, header))
    if skipped:
        print(f"\nskipped (over --budget-s {args.budget_s:g}): {'; '.join(skipped)}")


if __name__ == "__main__":
    main()
