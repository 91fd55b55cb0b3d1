"""Merging partial attention results by their log-sum-exp, in float32 (or float64).

``merge_by_lse`` is one fused pass on CUDA (a Triton kernel: read the accumulator and the
block once, write the accumulator once) and plain torch elsewhere. Unfused, the merge
is six elementwise kernels over a float32 ``[b, s, h, d]`` tensor per ring step, which
cost about a quarter of the attention time at 32K tokens on 4 H100s (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util

import torch

_TRITON = importlib.util.find_spec("triton") is not None


def merge_by_lse_torch(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """The plain-torch merge (any device); the definition the fused kernel is tested against."""
    new_lse = torch.logaddexp(lse, block_lse.to(lse.dtype))
    keep = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(block_lse.to(lse.dtype) - new_lse).transpose(1, 2).unsqueeze(-1)
    out.mul_(keep).add_(block_out.to(out.dtype) * take)
    lse.copy_(new_lse)


def merge_by_lse(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """In place: ``out, lse`` become the attention over the union of both key sets.

    out: [b, s, h, d] float32/64 accumulator (a view is fine); lse: [b, h, s] accumulator;
    block_out: [b, s, h, d] any float dtype; block_lse: [b, h, s]. Rows whose accumulator
    is empty (lse = -inf) take the block's result.
    """
    if (
        _TRITON
        and out.is_cuda
        and out.dtype == torch.float32
        and out.stride(-1) == 1
        and block_out.stride(-1) == 1
        and out.numel() > 0
    ):
        from usp_megatron.ring.merge_triton import merge_by_lse_triton

        merge_by_lse_triton(out, lse, block_out, block_lse)
    else:
        merge_by_lse_torch(out, lse, block_out, block_lse)
