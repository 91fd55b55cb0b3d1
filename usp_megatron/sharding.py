"""Split a full-sequence tensor into this rank's USP shard, and put shards back together.

The layout is a required argument: a shard made with one layout and attended with another
is silently wrong, so the caller names it (best: passes the attention module's own
``attn.layout``, or calls ``attn.shard`` / ``attn.gather``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_megatron.groups import USPGroups
from usp_megatron.layout import LayoutArg, resolve_layout


def shard_sequence(
    x: torch.Tensor,
    dim: int,
    groups: USPGroups,
    layout: LayoutArg,
    cu_seqlens_padded: torch.Tensor | None = None,
) -> torch.Tensor:
    """The positions of ``x`` along ``dim`` that this rank holds, in local order.

    ``layout``: a layout object or a name; with ``cu_seqlens_padded`` those of the packed
    documents derived from it (Megatron's THD split)."""
    layout = resolve_layout(layout, groups.ulysses_degree, groups.ring_degree, cu_seqlens_padded)
    positions = layout.positions(x.shape[dim], groups.ulysses_rank, groups.ring_rank)
    return x.index_select(dim, positions.to(x.device))


def gather_sequence(
    x_local: torch.Tensor,
    dim: int,
    groups: USPGroups,
    layout: LayoutArg,
    cu_seqlens_padded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence` over the context-parallel group (not differentiable)."""
    if groups.cp_group is None:
        raise ValueError("gather_sequence needs groups.cp_group (as init_usp_groups builds)")
    layout = resolve_layout(layout, groups.ulysses_degree, groups.ring_degree, cu_seqlens_padded)
    shards = [torch.empty_like(x_local) for _ in range(groups.cp_size)]
    dist.all_gather(shards, x_local.contiguous(), group=groups.cp_group)
    seq_len = x_local.shape[dim] * groups.cp_size
    shape = list(x_local.shape)
    shape[dim] = seq_len
    full = x_local.new_empty(shape)
    for cp_rank, shard in enumerate(shards):
        positions = layout.positions_of_cp_rank(seq_len, cp_rank).to(x_local.device)
        full.index_copy_(dim, positions, shard)
    return full
