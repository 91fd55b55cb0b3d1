"""Split a full-sequence tensor into this rank's USP shard, and put shards back together.

The layout is a required argument: a shard made with one layout and attended with another
is silently wrong, so the caller names it (best: passes the attention module's own
``attn.layout``, or calls ``attn.shard`` / ``attn.gather``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_megatron.groups import USPGroups, gather_ints
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
    _check_dim(x, dim)
    layout = resolve_layout(layout, groups.ulysses_degree, groups.ring_degree, cu_seqlens_padded)
    positions = layout.positions(x.shape[dim], groups.ulysses_rank, groups.ring_rank)
    return x.index_select(dim, positions.to(x.device))


def _check_dim(x: torch.Tensor, dim: int) -> None:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim {dim} is not a dimension of a {x.dim()}-D tensor of shape {tuple(x.shape)}: "
            "pass the sequence dimension (1 for [b, s, h, d], 0 for [s, b, h, d])"
        )


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
    _check_dim(x_local, dim)
    layout = resolve_layout(layout, groups.ulysses_degree, groups.ring_degree, cu_seqlens_padded)
    # Shards of different shapes would crash gloo (or hang NCCL) in the all-gather: their
    # shapes travel first, so every rank can say which rank holds what.
    seen = gather_ints(x_local.shape, groups.cp_group, groups.cp_size, x_local.device)
    if len(set(seen)) > 1:
        ranks = dist.get_process_group_ranks(groups.cp_group)
        raise ValueError(
            "gather_sequence: the ranks hold shards of different shapes ("
            + ", ".join(f"rank {rank}: {list(s)}" for rank, s in zip(ranks, seen))
            + "): every rank passes its shard of the same tensor"
        )
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
