"""The log-sum-exp merge as one Triton kernel (CUDA only; imported on first use)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr, blk_ptr, blk_lse_ptr,
    rows, seq, heads, dim,
    o_b, o_s, o_h, l_b, l_h, l_s, bo_b, bo_s, bo_h, bl_b, bl_h, bl_s,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = row < rows
    h = row % heads
    s = (row // heads) % seq
    b = row // (heads * seq)
    lse = tl.load(lse_ptr + b * l_b + h * l_h + s * l_s, mask=live, other=0.0)
    blk_lse = tl.load(blk_lse_ptr + b * bl_b + h * bl_h + s * bl_s, mask=live, other=0.0)
    blk_lse = blk_lse.to(tl.float32)
    top = tl.maximum(lse, blk_lse)
    keep = tl.exp(lse - top)
    take = tl.exp(blk_lse - top)
    total = keep + take
    tl.store(lse_ptr + b * l_b + h * l_h + s * l_s, top + tl.log(total), mask=live)
    keep = keep / total
    take = take / total
    d = tl.arange(0, BLOCK_D)
    cell = live[:, None] & (d[None, :] < dim)
    o_off = (b * o_b + s * o_s + h * o_h)[:, None] + d[None, :]
    bo_off = (b * bo_b + s * bo_s + h * bo_h)[:, None] + d[None, :]
    acc = tl.load(out_ptr + o_off, mask=cell, other=0.0)
    blk = tl.load(blk_ptr + bo_off, mask=cell, other=0.0).to(tl.float32)
    tl.store(out_ptr + o_off, acc * keep[:, None] + blk * take[:, None], mask=cell)


def merge_by_lse_triton(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Same contract as ``merge.merge_by_lse_torch``; out float32 with a unit last stride."""
    b, s, h, d = out.shape
    rows = b * s * h
    block_d = triton.next_power_of_2(d)
    block_rows = max(1, 4096 // block_d)
    grid = (triton.cdiv(rows, block_rows),)
    _merge_kernel[grid](
        out, lse, block_out, block_lse, rows, s, h, d,
        *out.stride()[:3], *lse.stride(), *block_out.stride()[:3], *block_lse.stride(),
        BLOCK_ROWS=block_rows, BLOCK_D=block_d,
    )
