"""What every attention kernel backend provides, and the checks they share.

A kernel computes attention of one local block: ``q: [b, sq, hq, d]``,
``k, v: [b, sk, hkv, d]`` with ``hq % hkv == 0`` (GQA/MQA), and returns the output
``[b, sq, hq, d]`` in the input dtype and the log-sum-exp ``[b, hq, sq]`` in float32 (or
float64 for float64 inputs). The backward takes the *final* output and log-sum-exp of
the whole ring (not the block's), which makes its block gradients exact contributions.

Which query rows see which key rows is a ``mask.BlockMask`` decided by the layout: a band
of diagonals counted from the top-left corner, trimmed so that no row is empty; or packed
documents (``BlockMask.documents``, kernels with ``takes_documents``), whose padding rows
see nothing and must come back as output 0, log-sum-exp -inf and zero gradients. (With
``sq != sk`` the ops' own ``is_causal`` flags differ: PyTorch's flash aligns the mask
bottom-right, cuDNN top-left; the kernels use them only for square blocks.)

Inputs are checked once where they enter (``LongContextAttention``), not per block: the
fast kernels run many blocks per call, and host time counts.
"""

from __future__ import annotations

from typing import Protocol

import torch

from usp_megatron.mask import BlockMask


class AttentionKernel(Protocol):
    name: str
    #: Whether it computes any ``BlockMask`` band (sliding windows), not only full and
    #: square-causal blocks.
    takes_windows: bool
    #: Whether it computes ``BlockMask.documents`` (packed documents, THD).
    takes_documents: bool

    def available(self, device: torch.device, dtype: torch.dtype) -> bool: ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where partial results accumulate: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> None:
    """Validate one block's shapes; raise ValueError naming what is wrong (the reference
    kernel, which is also called directly, checks every block; the fast ones do not)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [b, s, h, d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"query heads {q.shape[2]} must be a multiple of key/value heads {k.shape[2]}"
        )
    mask.flash_window(q.shape[1], k.shape[1])  # every row must see a key
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat key/value heads so every query head has its own: [b, s, hkv, d] -> [b, s, hq, d]."""
    group = num_q_heads // x.shape[2]
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def reduce_kv_heads(dx: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum gradients of repeated key/value heads back: [b, s, hq, d] -> [b, s, hkv, d]."""
    b, s, hq, d = dx.shape
    group = hq // num_kv_heads
    return dx if group == 1 else dx.view(b, s, num_kv_heads, group, d).sum(dim=3)
