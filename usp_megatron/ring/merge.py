"""Merging partial attention results by their log-sum-exp, in float32 (or float64)."""

from __future__ import annotations

import torch


def merge_by_lse(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """In place: ``out, lse`` become the attention over the union of both key sets.

    out: [b, s, h, d] accumulator (float32/64); lse: [b, h, s] accumulator;
    block_out: [b, s, h, d] any float dtype; block_lse: [b, h, s].
    A row whose accumulator is still empty (lse = -inf) takes the block's result.
    """
    new_lse = torch.logaddexp(lse, block_lse.to(lse.dtype))
    keep = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(block_lse.to(lse.dtype) - new_lse).transpose(1, 2).unsqueeze(-1)
    out.mul_(keep).add_(block_out.to(out.dtype) * take)
    lse.copy_(new_lse)
