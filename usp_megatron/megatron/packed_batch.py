"""A packed batch's layout, built once where the batch is split and carried to the layers.

Megatron hands every layer the same ``cu_seqlens_padded`` tensor (through
``PackedSeqParams``) and hands RoPE only that tensor, not the params. So the batch split
attaches a :class:`PackedBatch` to it: the packed layout (document boundaries read on the
host once per batch, block tasks and the all-to-all index computed once) and the rotary
row of each local token (on the device). Layers then read both without a host
synchronisation. A boundaries tensor that arrives without one (a caller's own
``PackedSeqParams``) gets one at its first layer, and the rest reuse it. The attachment
remembers the version counters of the boundaries it was built from: a tensor refilled in
place with another batch's documents gets a new one.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from usp_megatron.groups import USPGroups
from usp_megatron.layout import PackedZigzagLayout, SequenceLayout

_ATTRIBUTE = "_usp_packed_batch"


class PackedBatch(NamedTuple):
    layout: PackedZigzagLayout
    #: [t] int64 on the batch's device: the position of each local token inside its own
    #: document (its rotary-table row; Megatron's THD RoPE counts from 0 per document).
    rope_rows: torch.Tensor
    #: The rank the rows are for.
    ulysses_rank: int
    ring_rank: int
    #: What it was built from: the real boundaries (a weak reference: no cycle through the
    #: tensor it is attached to) and both tensors' version counters.
    cu_seqlens: weakref.ref | None
    versions: tuple[int, int]

    def is_for(
        self, groups: USPGroups, cu_seqlens_padded: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> bool:
        """Whether it still describes these boundaries on this rank."""
        layout = self.layout
        return (
            (layout.ulysses_degree, layout.ring_degree, self.ulysses_rank, self.ring_rank)
            == (groups.ulysses_degree, groups.ring_degree, groups.ulysses_rank, groups.ring_rank)
            and (None if self.cu_seqlens is None else self.cu_seqlens()) is cu_seqlens
            and self.versions == _versions(cu_seqlens_padded, cu_seqlens)
        )


def _versions(cu_seqlens_padded: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int]:
    """The version counters (bumped by every in-place write) of the boundaries."""
    return cu_seqlens_padded._version, -1 if cu_seqlens is None else cu_seqlens._version


def attach_packed_batch(
    cu_seqlens_padded: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    layout: SequenceLayout,
    groups: USPGroups,
) -> PackedBatch:
    """The :class:`PackedBatch` of these boundaries under the dense ``layout`` (its packed
    layout: one host read of the boundaries), attached to ``cu_seqlens_padded``; an
    attachment that still describes them is returned as it is. ``cu_seqlens=None``: no
    padding."""
    found = packed_batch_of(cu_seqlens_padded)
    if found is not None and found.is_for(groups, cu_seqlens_padded, cu_seqlens):
        return found
    packed = layout.packed(cu_seqlens_padded, cu_seqlens)
    u, r = groups.ulysses_rank, groups.ring_rank
    rows = packed.document_positions(u, r).to(cu_seqlens_padded.device)
    built_from = None if cu_seqlens is None else weakref.ref(cu_seqlens)
    versions = _versions(cu_seqlens_padded, cu_seqlens)
    batch = PackedBatch(packed, rows, u, r, built_from, versions)
    setattr(cu_seqlens_padded, _ATTRIBUTE, batch)
    return batch


def packed_batch_of(cu_seqlens_padded: torch.Tensor) -> PackedBatch | None:
    """The :class:`PackedBatch` attached to these boundaries, if any (RoPE, which sees only
    this tensor, takes it as it is)."""
    return getattr(cu_seqlens_padded, _ATTRIBUTE, None)
