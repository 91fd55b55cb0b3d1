"""Tensor copies that the all-to-all and the ring share (no communication here)."""

from __future__ import annotations

import torch


def _as_words(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` viewed as int64 words along its last dim, if its strides and offset allow."""
    size = x.element_size()
    if size >= 8 or x.dim() == 0 or x.stride(-1) != 1 or x.shape[-1] * size % 8:
        return None
    if x.storage_offset() * size % 8 or any(st * size % 8 for st in x.stride()[:-1]):
        return None
    return x.view(torch.int64)


def copy_words_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for same-dtype tensors, moving 8-byte words where the layout allows.

    A permuted copy of 2-byte elements runs the element-wise kernel at a fraction of the
    memory bandwidth; the same bytes moved as int64 words need a quarter of the index work.
    """
    words = (_as_words(dst), _as_words(src)) if dst.dtype == src.dtype else (None, None)
    if words[0] is not None and words[1] is not None:
        words[0].copy_(words[1])
    else:
        dst.copy_(src)
    return dst


def stack_pair(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch.stack([a, b]).to(dtype)``, as one tensor the ring sends in one message.

    Dense inputs of that dtype take one stack kernel; otherwise one pass per tensor (8-byte
    words where the dtype stays), since the inputs are then head slices of the all-to-all's
    packed buffer, which a stack would read element by element.
    """
    if dtype == a.dtype and a.is_contiguous() and b.is_contiguous():
        return torch.stack([a, b])
    pair = a.new_empty((2, *a.shape), dtype=dtype)
    for dst, src in zip(pair, (a, b)):
        copy_words_(dst, src)
    return pair
