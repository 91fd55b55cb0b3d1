"""One GPU: what a rank's attention work costs, for the figures the docs quote.

Parts (``--parts``, comma-separated):

- ``overhead``: fwd+bwd per call of ``LongContextAttention`` on one rank against a bare
  cuDNN SDPA call, at short sequences where host time decides (the 1.3B example's 16
  heads of 128). Run it under two checkouts (``PYTHONPATH``) for an A/B of the package.
- ``window``: fwd+bwd of the whole sequence on one GPU, dense (cuDNN, flash) against a
  sliding window (flash), and the share of ring block work a window leaves per layout.
- ``packed``: packed documents (varlen flash) against dense causal of the same length.
- ``tiled``: one block of a causal sliding window (``--window``, default 4096) at 16K to
  128K tokens, 32 heads x 128, bf16, fwd+bwd, kernel calls only: dense causal cuDNN, the
  window on flash alone (``torch_flash``), and on ``torch_window`` (kernels/windowed.py)
  with its tile rules; the ratio of ``torch_window`` to dense cuDNN; and its output and
  dq against flash's as a check. About a minute on one H100/H200.
- ``blocks``: cuDNN fwd+bwd time and TFLOP/s of one ring block by block length and heads
  per rank: the kernel-efficiency term of ``choose_degrees``' cost model.

Prints a table per part and writes ``<out>/<part>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.attention
import torch.nn.functional as F

import usp_megatron
from usp_megatron import LongContextAttention, init_usp_groups


def timed_ms(step: Callable[[], None], warmup: int, iters: int) -> float:
    """Mean wall time of ``step`` over ``iters`` calls, synchronised once at the end (so
    host-bound calls count their host time and GPU-bound ones their GPU time)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def causal_flops(seq_len: int, heads: int, head_dim: int, window: int | None = None) -> float:
    """fwd+bwd FLOPs of causal attention (3.5 x the forward's 2 matmuls over the visible
    pairs), the convention of bench_attention.py."""
    pairs = seq_len * (seq_len + 1) / 2
    if window is not None:
        pairs = sum(min(i + 1, window + 1) for i in range(seq_len))
    return 3.5 * 4 * pairs * heads * head_dim


def make_qkv(seq_len: int, heads: int, head_dim: int) -> list[torch.Tensor]:
    return [
        torch.randn(1, seq_len, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
        for _ in range(3)
    ]  # fmt: skip


def overhead(args: argparse.Namespace) -> list[dict]:
    groups = init_usp_groups(1, 1)
    attn = LongContextAttention(groups, layout="zigzag", backend="torch_cudnn")
    rows = []
    for seq_len in (2048, 4096, 8192):
        q, k, v = make_qkv(seq_len, 16, 128)
        dout = torch.randn_like(q)
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        doutt = dout.transpose(1, 2).contiguous()

        def usp(q=q, k=k, v=v, dout=dout) -> None:
            attn(q, k, v, causal=True).backward(dout)

        def sdpa(q=qt, k=kt, v=vt, dout=doutt) -> None:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

        usp_ms = timed_ms(usp, 20, args.iters)
        sdpa_ms = timed_ms(sdpa, 20, args.iters)
        rows.append(dict(seq_len=seq_len, usp_ms=usp_ms, sdpa_ms=sdpa_ms,
                         usp_minus_sdpa_ms=usp_ms - sdpa_ms,
                         package=str(Path(usp_megatron.__file__).parent)))  # fmt: skip
    print(f"\noverhead (package {rows[0]['package']})")
    print(f"{'tokens':>8} {'USP ms':>9} {'SDPA ms':>9} {'USP - SDPA':>11}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['usp_ms']:>9.3f} {r['sdpa_ms']:>9.3f} "
              f"{r['usp_minus_sdpa_ms']:>11.3f}")  # fmt: skip
    return rows


def window(args: argparse.Namespace) -> list[dict]:
    from usp_megatron.layout import LAYOUT_NAMES, get_layout

    groups = init_usp_groups(1, 1)
    rows = []
    size = args.window
    for seq_len in (32768, 65536, 131072):
        q, k, v = make_qkv(seq_len, 32, 128)
        dout = torch.randn_like(q)
        for name, backend, win in (("dense cuDNN", "torch_cudnn", None),
                                   ("dense flash", "torch_flash", None),
                                   (f"window {size} flash", "torch_flash", (size, 0))):  # fmt: skip
            attn = LongContextAttention(groups, backend=backend)

            def step(attn=attn, win=win, q=q, k=k, v=v, dout=dout) -> None:
                attn(q, k, v, causal=True, window_size=win).backward(dout)

            ms = timed_ms(step, 3, args.iters_long)
            flops = causal_flops(seq_len, 32, 128, size if win else None)
            rows.append(dict(part="one GPU", seq_len=seq_len, method=name, ms=ms,
                             tflops=flops / ms / 1e9))  # fmt: skip
        del q, k, v, dout
        for impl in LAYOUT_NAMES:
            for ring in (4, 8):
                layout = get_layout(impl, 1, ring)
                block = seq_len // ring
                work = [
                    sum(
                        task_area(t, block)
                        for t in layout.block_tasks(r, (r - s) % ring, block, True, (size, 0))
                    )
                    for r in range(ring)
                    for s in range(layout.ring_steps(block, True, (size, 0)))
                ]
                dense = [
                    sum(task_area(t, block) for t in layout.block_tasks(r, (r - s) % ring, block,
                                                                         True))
                    for r in range(ring)
                    for s in range(ring)
                ]  # fmt: skip
                rows.append(dict(part="ring work", seq_len=seq_len, impl=impl, ring=ring,
                                 steps=layout.ring_steps(block, True, (size, 0)),
                                 work_vs_dense=sum(work) / sum(dense)))  # fmt: skip
    print(f"\nsliding window {size} (causal), 32 heads x 128, bf16, fwd+bwd, one GPU")
    print(f"{'tokens':>8} {'method':<22} {'ms':>9} {'TFLOP/s':>9}")
    for r in rows:
        if r["part"] == "one GPU":
            print(f"{r['seq_len']:>8} {r['method']:<22} {r['ms']:>9.2f} {r['tflops']:>9.1f}")
    print(f"\nring block area a window of {size} computes, vs causal dense (per pass)")
    print(f"{'tokens':>8} {'layout':<8} {'R':>3} {'steps':>6} {'work / dense':>13}")
    for r in rows:
        if r["part"] == "ring work":
            print(f"{r['seq_len']:>8} {r['impl']:<8} {r['ring']:>3} {r['steps']:>6} "
                  f"{r['work_vs_dense']:>13.3f}")  # fmt: skip
    return rows


def task_area(task: object, block_len: int) -> int:
    """Visible (query, key) pairs of one block task, counted row by row (no [sq, sk] mask)."""
    rows = len(range(block_len)[task.q_rows])
    cols = len(range(block_len)[task.kv_rows])
    i = torch.arange(rows)
    first = i + task.mask.lo if task.mask.lo is not None else torch.zeros_like(i)
    last = i + task.mask.hi if task.mask.hi is not None else torch.full_like(i, cols - 1)
    return int((last.clamp(max=cols - 1) - first.clamp(min=0) + 1).clamp(min=0).sum())


def blocks(args: argparse.Namespace) -> list[dict]:
    from usp_megatron.kernels import get_kernel
    from usp_megatron.mask import CAUSAL

    kernel = get_kernel("torch_cudnn", "cuda", torch.bfloat16)
    rows = []
    for heads in (4, 8, 16, 32):
        for block_len in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
            q, k, v = make_qkv(block_len, heads, 128)
            q, k, v = q.detach(), k.detach(), v.detach()
            dout = torch.randn_like(q)

            def step(q=q, k=k, v=v, dout=dout) -> None:
                out, lse = kernel.forward(q, k, v, CAUSAL, 128**-0.5)
                kernel.backward(dout, q, k, v, out, lse, CAUSAL, 128**-0.5)

            ms = timed_ms(step, 3, max(3, args.iters_long))
            tflops = causal_flops(block_len, heads, 128) / ms / 1e9
            rows.append(dict(heads=heads, block_len=block_len, ms=ms, tflops=tflops))
            del q, k, v, dout
    print("\ncuDNN causal block, fwd+bwd, bf16, head dim 128: TFLOP/s")
    lengths = sorted({r["block_len"] for r in rows})
    print(f"{'heads':>6} " + " ".join(f"{n // 1024:>6}K" for n in lengths))
    for heads in sorted({r["heads"] for r in rows}):
        cells = [next(r["tflops"] for r in rows if r["heads"] == heads and r["block_len"] == n)
                 for n in lengths]  # fmt: skip
        print(f"{heads:>6} " + " ".join(f"{c:>7.0f}" for c in cells))
    return rows


def packed(args: argparse.Namespace) -> list[dict]:
    """Packed documents (varlen flash) against dense causal attention of the same length."""
    groups = init_usp_groups(1, 1)
    rows = []
    for seq_len, docs in ((32768, 8), (32768, 32), (131072, 32)):
        q, k, v = make_qkv(seq_len, 32, 128)
        dout = torch.randn_like(q)
        cu = torch.arange(0, seq_len + 1, seq_len // docs, dtype=torch.int32, device="cuda")
        methods = [("dense cuDNN", "torch_cudnn", None), ("dense flash", "torch_flash", None),
                   (f"{docs} documents, flash varlen", "torch", cu)]  # fmt: skip
        for name, backend, cu_seqlens in methods:
            attn = LongContextAttention(groups, backend=backend)

            def step(attn=attn, cu_seqlens=cu_seqlens, q=q, k=k, v=v, dout=dout) -> None:
                attn(q, k, v, causal=True, cu_seqlens=cu_seqlens).backward(dout)

            ms = timed_ms(step, 3, args.iters_long)
            rows.append(dict(seq_len=seq_len, documents=docs, method=name, ms=ms))
        del q, k, v, dout
    print("\npacked documents vs dense causal, 32 heads x 128, bf16, fwd+bwd, one GPU")
    print(f"{'tokens':>8} {'method':<30} {'ms':>9}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['method']:<30} {r['ms']:>9.2f}")
    return rows


def tiled(args: argparse.Namespace) -> list[dict]:
    """The tiled window kernel against flash's windowed op and dense causal cuDNN."""
    from usp_megatron.kernels import get_kernel
    from usp_megatron.kernels.windowed import TiledWindowKernel
    from usp_megatron.mask import CAUSAL, BlockMask

    cudnn = get_kernel("torch_cudnn", "cuda", torch.bfloat16)
    flash = get_kernel("torch_flash", "cuda", torch.bfloat16, windows=True)
    default = get_kernel("torch", "cuda", torch.bfloat16, windows=True)
    variants = {
        "dense cuDNN": (cudnn, None),
        "window flash": (flash, "band"),
        f"window {default.name}": (default, "band"),
        "tiled, tile band/2": (TiledWindowKernel(cudnn, flash, divisor=2), "band"),
        "tiled, tile band/2, reversed": (
            TiledWindowKernel(cudnn, flash, divisor=2, flip_triangles=True), "band"),
        "tiled, tile band/1": (TiledWindowKernel(cudnn, flash, divisor=1), "band"),
    }  # fmt: skip
    size, scale, rows = args.window, 128**-0.5, []
    for seq_len in args.tiled_seqlens:
        q = make_qkv(seq_len, args.tiled_heads, 128)[0].detach()
        k, v = (x.detach() for x in make_qkv(seq_len, args.tiled_kv_heads, 128)[:2])
        dout = torch.randn_like(q)
        band, reference = BlockMask(-size, 0), None
        for name, (kernel, masked) in variants.items():
            mask = band if masked else CAUSAL

            def step(kernel=kernel, mask=mask, q=q, k=k, v=v, dout=dout) -> tuple:
                out, lse = kernel.forward(q, k, v, mask, scale)
                return out, kernel.backward(dout, q, k, v, out, lse, mask, scale)[0]

            row = dict(seq_len=seq_len, method=name)
            if masked:  # "window flash" first: the others' output and dq against it
                got = step()
                reference = reference or got
                row["err_out"], row["err_dq"] = (
                    float((a.float() - b.float()).norm() / b.float().norm())
                    for a, b in zip(got, reference)
                )
                del got
            ms = timed_ms(step, 2, args.iters_long)
            flops = causal_flops(seq_len, 32, 128, size if masked else None)
            rows.append(dict(row, ms=ms, tflops=flops / ms / 1e9))
        del q, k, v, dout, reference
        torch.cuda.empty_cache()
    heads = f"{args.tiled_heads}/{args.tiled_kv_heads} heads x 128"
    print(f"\ncausal window {size}, {heads}, bf16, fwd+bwd, one block on one GPU "
          f"({torch.cuda.get_device_name()})")  # fmt: skip
    print(f"{'tokens':>8} {'method':<32} {'ms':>9} {'TFLOP/s':>8} {'vs dense':>9} "
          f"{'out err':>8} {'dq err':>8}")  # fmt: skip
    for r in rows:
        dense = next(x["ms"] for x in rows if x["seq_len"] == r["seq_len"]
                     and x["method"] == "dense cuDNN")  # fmt: skip
        r["vs_dense"] = r["ms"] / dense
        errs = f"{r['err_out']:>8.1e} {r['err_dq']:>8.1e}" if "err_out" in r else ""
        print(f"{r['seq_len']:>8} {r['method']:<32} {r['ms']:>9.2f} {r['tflops']:>8.0f} "
              f"{r['vs_dense']:>9.3f} {errs}")  # fmt: skip
    print(f"\n{'tokens':>8} {'dense cuDNN ms':>15} {'flash window ms':>16} "
          f"{default.name + ' ms':>17} {default.name + ' / dense':>20}")  # fmt: skip
    for seq_len in sorted({r["seq_len"] for r in rows}):
        ms = {r["method"]: r["ms"] for r in rows if r["seq_len"] == seq_len}
        ours = ms[f"window {default.name}"]
        print(f"{seq_len:>8} {ms['dense cuDNN']:>15.2f} {ms['window flash']:>16.2f} "
              f"{ours:>17.2f} {ours / ms['dense cuDNN']:>20.3f}")  # fmt: skip
    return rows


PARTS = {"overhead": overhead, "window": window, "blocks": blocks, "packed": packed,
         "tiled": tiled}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="overhead,window,blocks")
    parser.add_argument("--window", type=int, default=4096, help="sliding window (left)")
    parser.add_argument(
        "--tiled-seqlens",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[16384, 32768, 65536, 131072],
        help="sequence lengths of the tiled part",
    )
    parser.add_argument("--tiled-heads", type=int, default=32, help="query heads, tiled part")
    parser.add_argument("--tiled-kv-heads", type=int, default=32, help="key/value heads")
    parser.add_argument("--iters", type=int, default=200, help="iterations, overhead part")
    parser.add_argument("--iters-long", type=int, default=5, help="iterations, long parts")
    parser.add_argument("--out", default="runs/bench_kernels")
    parser.add_argument("--tag", default="", help="suffix of the JSON names (A/B runs)")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    for part in parts:
        if part not in PARTS:
            raise SystemExit(f"--parts: {part!r} is not one of {list(PARTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py measures one CUDA GPU; none is visible here")
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    for part in parts:
        rows = PARTS[part](args)
        record = {"device": device, "torch": torch.__version__, "rows": rows}
        (out / f"{part}{args.tag}.json").write_text(json.dumps(record, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
