"""PyTorch's own fused attention ops (CUDA): flash, cuDNN and memory-efficient.

These private aten ops return the log-sum-exp and have direct backward ops that take
the final output and log-sum-exp, which is what ring attention needs. They take
``[b, h, s, d]`` tensors; ours are ``[b, s, h, d]``, so a transpose view is passed (no
copy). cuDNN is the fastest on H100 (docs/benchmarks.md), then flash, then efficient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from usp_megatron.kernels.base import expand_kv_heads, reduce_kv_heads
from usp_megatron.mask import BlockMask, Documents

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)
Pair = tuple[Tensor, Tensor]
Triple = tuple[Tensor, Tensor, Tensor]


def _t(x: torch.Tensor) -> torch.Tensor:
    """[b, s, h, d] <-> [b, h, s, d], a view."""
    return x.transpose(1, 2)


def _empty(device: torch.device) -> torch.Tensor:
    return torch.empty(0, device=device)


def _dense(mask: BlockMask, sq: int, sk: int) -> bool:
    """Full, or causal on a square block: what the SDPA ops' ``is_causal`` flag says."""
    return mask.is_full or (mask.is_causal and sq == sk)


class _VarlenRows(NamedTuple):
    """The rows of a block's document segments, packed one after another for the varlen op."""

    q: Tensor  # [total_q] int64: block rows of the queries, document by document
    k: Tensor  # [total_k]
    cu_q: Tensor  # [documents + 1] int32
    cu_k: Tensor


@functools.lru_cache(maxsize=256)
def _varlen_rows(documents: Documents, device: torch.device) -> _VarlenRows:
    def rows(starts: tuple[int, ...], lens: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        index = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lens)])
        cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return index.to(device, non_blocking=True), cu.to(device, non_blocking=True)

    (q, cu_q), (k, cu_k) = (
        rows(documents.q_starts, documents.q_lens),
        rows(documents.k_starts, documents.k_lens),
    )
    return _VarlenRows(q, k, cu_q, cu_k)


def _varlen_forward(q: Tensor, k: Tensor, v: Tensor, documents: Documents, scale: float) -> Pair:
    """Packed documents (batch 1) through the varlen flash op. Only the segments' rows go
    in (one gather each); rows outside every segment get output 0 and lse -inf. Its GPU
    tests pass on one H200 (written against torch 2.11's schema: lse ``[h, total_q]``)."""
    rows = _varlen_rows(documents, q.device)
    out_rows, lse_rows, *_ = aten._flash_attention_forward(
        q[0].index_select(0, rows.q),  # [total_q, hq, d]
        k[0].index_select(0, rows.k),  # [total_k, hkv, d]
        v[0].index_select(0, rows.k),
        rows.cu_q, rows.cu_k, documents.max_q, documents.max_k, 0.0, documents.causal, False,
        scale=scale,
    )  # fmt: skip
    out = torch.zeros_like(q)
    out[0].index_copy_(0, rows.q, out_rows)
    lse = torch.full(
        (1, q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device
    )
    lse[0].index_copy_(1, rows.q, lse_rows.view(q.shape[2], -1))  # [hq, total_q]
    return out, lse


def _varlen_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    documents: Documents, scale: float,
) -> Triple:  # fmt: skip
    """The backward of :func:`_varlen_forward`: padding rows get exactly zero gradients."""
    rows = _varlen_rows(documents, q.device)
    dq_rows, dk_rows, dv_rows = aten._flash_attention_backward(
        dout[0].index_select(0, rows.q),
        q[0].index_select(0, rows.q),
        k[0].index_select(0, rows.k),
        v[0].index_select(0, rows.k),
        out[0].index_select(0, rows.q),
        lse[0].index_select(1, rows.q).float().contiguous(),  # [hq, total_q]
        rows.cu_q, rows.cu_k, documents.max_q, documents.max_k, 0.0, documents.causal,
        _empty(q.device), _empty(q.device), scale=scale,
    )  # fmt: skip
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq[0].index_copy_(0, rows.q, dq_rows)
    dk[0].index_copy_(0, rows.k, dk_rows)
    dv[0].index_copy_(0, rows.k, dv_rows)
    return dq, dk, dv


class FlashSDPAKernel:
    """``aten._scaled_dot_product_flash_attention``: fp16/bf16, GQA shapes accepted; banded
    (sliding-window) blocks and packed documents (varlen) through
    ``aten._flash_attention_forward/_backward``, which take FlashAttention's
    ``window_size_left/right`` and ``cum_seq_q/k``."""

    name = "torch_flash"
    takes_windows = True
    takes_documents = True

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and dtype in _HALF

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float) -> Pair:
        sq, sk = q.shape[1], k.shape[1]
        if mask.documents is not None:
            return _varlen_forward(q, k, v, mask.documents, scale)
        if not _dense(mask, sq, sk):
            left, right = mask.flash_window(sq, sk)
            out, lse, *_ = aten._flash_attention_forward(
                q,
                k,
                v,
                None,
                None,
                sq,
                sk,
                0.0,
                False,
                False,
                scale=scale,
                window_size_left=left,
                window_size_right=right,
            )
            return out, lse
        out, lse, *_ = aten._scaled_dot_product_flash_attention(
            _t(q), _t(k), _t(v), 0.0, mask.is_causal, False, scale=scale
        )
        return _t(out), lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        mask: BlockMask,
        scale: float,
    ) -> Triple:
        sq, sk = q.shape[1], k.shape[1]
        if mask.documents is not None:
            return _varlen_backward(dout, q, k, v, out, lse, mask.documents, scale)
        if not _dense(mask, sq, sk):
            left, right = mask.flash_window(sq, sk)
            return aten._flash_attention_backward(
                dout,
                q,
                k,
                v,
                out,
                lse.contiguous(),
                None,
                None,
                sq,
                sk,
                0.0,
                False,
                _empty(q.device),
                _empty(q.device),
                scale=scale,
                window_size_left=left,
                window_size_right=right,
            )
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            _t(dout),
            _t(q),
            _t(k),
            _t(v),
            _t(out),
            lse.contiguous(),
            None,
            None,
            sq,
            sk,
            0.0,
            mask.is_causal,
            _empty(q.device),
            _empty(q.device),
            scale=scale,
        )
        return _t(dq), _t(dk), _t(dv)


class CudnnSDPAKernel:
    """``aten._scaled_dot_product_cudnn_attention``: fp16/bf16 on sm80+, GQA shapes accepted."""

    name = "torch_cudnn"
    takes_windows = False
    takes_documents = False

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        if device.type != "cuda" or dtype not in _HALF:
            return False
        return torch.cuda.get_device_capability(device) >= (8, 0)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float) -> Pair:
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(
            _t(q), _t(k), _t(v), None, True, 0.0, mask.is_causal, False, scale=scale
        )
        return _t(out), lse.reshape(lse.shape[:3])

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        mask: BlockMask,
        scale: float,
    ) -> Triple:
        sq, sk = q.shape[1], k.shape[1]
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            _t(dout),
            _t(q),
            _t(k),
            _t(v),
            _t(out),
            lse.contiguous().unsqueeze(-1),
            _empty(q.device),
            _empty(q.device),
            None,
            None,
            None,
            sq,
            sk,
            0.0,
            mask.is_causal,
            scale=scale,
        )
        return _t(dq), _t(dk), _t(dv)


class EfficientSDPAKernel:
    """``aten._scaled_dot_product_efficient_attention``: any float dtype, no GQA shapes.

    Its log-sum-exp is padded to a multiple of 32 along the sequence; we return the
    ``sq`` real rows and pad again for the backward.
    """

    name = "torch_efficient"
    takes_windows = False
    takes_documents = False

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and dtype in (*_HALF, torch.float32)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float) -> Pair:
        hq = q.shape[2]
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(
            _t(q),
            _t(expand_kv_heads(k, hq)),
            _t(expand_kv_heads(v, hq)),
            None,
            True,
            0.0,
            mask.is_causal,
            scale=scale,
        )
        return _t(out), lse[:, :, : q.shape[1]]

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        mask: BlockMask,
        scale: float,
    ) -> Triple:
        hq, hkv, sq = q.shape[2], k.shape[2], q.shape[1]
        if out.stride(1) != out.shape[2] * out.shape[3] or out.stride(2) != out.shape[3]:
            # The op's backward reads out with the row stride of a [b, s, h, d] tensor,
            # whatever out's own strides are (dq and dk came out wrong with batch 2).
            out = out.contiguous()
        padded = torch.full(
            (*lse.shape[:2], -(-sq // 32) * 32), float("inf"), dtype=lse.dtype, device=lse.device
        )
        padded[:, :, :sq] = lse
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            _t(dout),
            _t(q),
            _t(expand_kv_heads(k, hq)),
            _t(expand_kv_heads(v, hq)),
            None,
            _t(out),
            padded,
            _empty(q.device),
            _empty(q.device),
            0.0,
            [True, True, True, False],
            mask.is_causal,
            scale=scale,
        )
        return _t(dq), reduce_kv_heads(_t(dk), hkv), reduce_kv_heads(_t(dv), hkv)
