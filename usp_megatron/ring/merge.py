"""Merging partial attention results by their log-sum-exp, in float32 (or float64)."""

from __future__ import annotations

import torch


def merge_by_lse(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """In place: ``out, lse`` become the attention over the union of both key sets.

    out: [b, rows, h, d] float32/64 accumulator (a view is fine); lse: [b, h, rows]
    accumulator; block_out: [b, rows, h, d] any float dtype; block_lse: [b, h, rows] (the
    rows of one block task, out of a ring block's ``U*s``). Rows whose accumulator
    is empty (lse = -inf) take the block's result; rows empty in both (packed documents'
    padding) stay 0 with lse -inf, not NaN. Two passes over ``out``: a scale, then
    a multiply-add that reads the block in its own dtype (no float32 copy of it).
    """
    block_lse = block_lse.to(lse.dtype)
    new_lse = torch.logaddexp(lse, block_lse)
    # -inf - -inf is NaN: shift empty rows by 0 instead, which weighs both sides by 0.
    shift = new_lse.masked_fill(torch.isneginf(new_lse), 0.0)
    # weights [b, h, rows] -> [b, rows, h, 1], to scale out's rows head by head
    keep = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(block_lse - shift).transpose(1, 2).unsqueeze(-1)
    out.mul_(keep).addcmul_(block_out, take)
    lse.copy_(new_lse)
