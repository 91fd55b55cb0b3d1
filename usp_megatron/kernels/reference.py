"""Plain-torch attention: any device, float32 (or float64) accumulation.

The CPU path and the oracle the fast kernels are checked against. It materializes the
``[sq, sk]`` score matrix, so it is for small blocks. A row that sees no key (packed
documents: padding) gets output 0, log-sum-exp -inf and no gradient, never NaN.
"""

from __future__ import annotations

import torch

from usp_megatron.kernels.base import (
    accum_dtype,
    check_block,
    expand_kv_heads,
    reduce_kv_heads,
)
from usp_megatron.mask import BlockMask


def _scores(q: torch.Tensor, k: torch.Tensor, mask: BlockMask, scale: float) -> torch.Tensor:
    """[b, h, sq, sk] scaled scores in the accumulation dtype, -inf where masked."""
    acc = accum_dtype(q.dtype)
    k = expand_kv_heads(k, q.shape[2])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    if not mask.is_full:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(~mask.visible(sq, sk, q.device), float("-inf"))
    return scores


def _probs(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(scores - lse)``; 0 (not NaN) on rows that see nothing (lse = -inf)."""
    lse = lse.to(scores.dtype)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite.unsqueeze(-1))


class ReferenceKernel:
    name = "reference"
    takes_windows = True
    takes_documents = True

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_block(q, k, v, mask)
        scores = _scores(q, k, mask, scale)
        lse = torch.logsumexp(scores, dim=-1)
        probs = _probs(scores, lse)
        v_full = expand_kv_heads(v, q.shape[2]).to(scores.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v_full)
        return out.to(q.dtype), lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        mask: BlockMask,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_block(q, k, v, mask)
        scores = _scores(q, k, mask, scale)
        acc = scores.dtype
        probs = _probs(scores, lse)
        dout_a = dout.to(acc)
        k_full = expand_kv_heads(k, q.shape[2]).to(acc)
        v_full = expand_kv_heads(v, q.shape[2]).to(acc)
        dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout_a)
        dprobs = torch.einsum("bqhd,bkhd->bhqk", dout_a, v_full)
        row_dot = (dout_a * out.to(acc)).sum(-1).transpose(1, 2)  # [b, h, sq]
        dscores = probs * (dprobs - row_dot.unsqueeze(-1))
        dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_full) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.to(acc)) * scale
        hkv = k.shape[2]
        return (
            dq.to(q.dtype),
            reduce_kv_heads(dk, hkv).to(k.dtype),
            reduce_kv_heads(dv, hkv).to(v.dtype),
        )
