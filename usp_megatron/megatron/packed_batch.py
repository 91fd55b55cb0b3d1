"""A packed batch's layout, built once where the batch is split and carried to the layers.

Megatron hands every layer the same ``cu_seqlens_padded`` tensor (through
``PackedSeqParams``) and hands RoPE only that tensor, not the params. So the batch split
attaches a :class:`PackedBatch` to it: the packed layout (document boundaries read on the
host once per batch, block tasks and the all-to-all index computed once) and the rotary
row of each local token (on the device). Layers then read both without a host
synchronisation. A boundaries tensor that arrives without one (a caller's own
``PackedSeqParams``) gets one at its first layer, and the rest reuse it. (The attachment
lives as long as the tensor: a boundaries tensor refilled in place with another batch's
documents would keep the old layout. Megatron's loaders, and the example's, make new
tensors for every batch.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from usp_megatron.groups import USPGroups
from usp_megatron.layout import PackedZigzagLayout, check_packs_documents, packed_layout

_ATTRIBUTE = "_usp_packed_batch"


class PackedBatch(NamedTuple):
    layout: PackedZigzagLayout
    #: [t_local] int64 on the batch's device: the position of each local token inside its
    #: own document (its rotary-table row; Megatron's THD RoPE counts from 0 per document).
    rope_rows: torch.Tensor
    #: The rank the rows are for.
    ulysses_rank: int
    ring_rank: int

    def is_for(self, groups: USPGroups) -> bool:
        layout = self.layout
        return (layout.ulysses_degree, layout.ring_degree, self.ulysses_rank, self.ring_rank) == (
            groups.ulysses_degree, groups.ring_degree, groups.ulysses_rank, groups.ring_rank
        )  # fmt: skip


def attach_packed_batch(
    cu_seqlens_padded: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    ring_impl: str,
    groups: USPGroups,
) -> PackedBatch:
    """Build the batch's :class:`PackedBatch` (one host read of the boundaries) and attach
    it to ``cu_seqlens_padded``; returns it. ``cu_seqlens=None``: no padding."""
    check_packs_documents(ring_impl)
    found = packed_batch_of(cu_seqlens_padded)
    if found is not None and found.is_for(groups):
        return found
    layout = packed_layout(
        ring_impl, groups.ulysses_degree, groups.ring_degree, cu_seqlens_padded, cu_seqlens
    )
    u, r = groups.ulysses_rank, groups.ring_rank
    rows = layout.document_positions(u, r).to(cu_seqlens_padded.device)
    batch = PackedBatch(layout, rows, u, r)
    setattr(cu_seqlens_padded, _ATTRIBUTE, batch)
    return batch


def packed_batch_of(cu_seqlens_padded: torch.Tensor) -> PackedBatch | None:
    """The :class:`PackedBatch` attached to these boundaries, if any."""
    return getattr(cu_seqlens_padded, _ATTRIBUTE, None)
