"""The ulysses all-to-all of any layout: the layout's placement says how pieces move.

Dense layouts receive every piece straight into its ring-block slot
(``all_to_all.slotted_*``); packed documents receive rank by rank into a staging buffer
and reorder by one index (``packed_all_to_all.staged_*``). Both take the run views of
``split_heads`` and give the same results, so the attention has one pipeline.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from usp_megatron.comm.all_to_all import (
    PendingExchange,
    slotted_heads_to_seq_start,
    slotted_seq_to_heads_start,
)
from usp_megatron.comm.packed_all_to_all import (
    staged_heads_to_seq_start,
    staged_seq_to_heads_start,
)
from usp_megatron.layout import SequenceLayout


def seq_to_heads_start(
    tensors: list[list[torch.Tensor]], layout: SequenceLayout, group: ProcessGroup
) -> PendingExchange:
    """Run views [b, s, ranks, h_i, d] of each tensor -> after ``wait()``: [b, U*s, h_i, d]
    each, this ulysses rank's heads over its whole ring block, in position order."""
    placement = layout.ulysses_placement
    if placement.into_slots:
        return slotted_seq_to_heads_start(tensors, placement, group)
    return staged_seq_to_heads_start(tensors, placement, group)


def heads_to_seq_start(
    tensors: list[torch.Tensor],
    destinations: list[list[torch.Tensor]],
    layout: SequenceLayout,
    group: ProcessGroup,
) -> PendingExchange:
    """[b, U*s, h_i, d] each (ring-block order) -> after ``wait()``: copied into the run
    views ``destinations``. ``sent``, where set, is the sequence-major tensor that went out
    (the caller may keep it instead of its own output)."""
    placement = layout.ulysses_placement
    if placement.into_slots:
        return slotted_heads_to_seq_start(tensors, destinations, placement, group)
    return staged_heads_to_seq_start(tensors, destinations, placement, group)
