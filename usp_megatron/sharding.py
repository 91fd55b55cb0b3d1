"""Split a full-sequence tensor into this rank's USP shard, and put shards back together."""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_megatron.groups import USPGroups
from usp_megatron.layout import local_positions


def rank_positions(
    seq_len: int, groups: USPGroups, ring_impl: str = "zigzag", cp_rank: int | None = None
) -> torch.Tensor:
    """``local_positions`` of context-parallel rank ``cp_rank`` (default: this rank)."""
    c = groups.cp_rank if cp_rank is None else cp_rank
    u, r = c % groups.ulysses_degree, c // groups.ulysses_degree
    return local_positions(seq_len, groups.ulysses_degree, groups.ring_degree, u, r, ring_impl)


def shard_sequence(
    x: torch.Tensor, dim: int, groups: USPGroups, ring_impl: str = "zigzag"
) -> torch.Tensor:
    """The positions of ``x`` along ``dim`` that this rank holds, in local order."""
    positions = rank_positions(x.shape[dim], groups, ring_impl)
    return x.index_select(dim, positions.to(x.device))


def gather_sequence(
    x_local: torch.Tensor, dim: int, groups: USPGroups, ring_impl: str = "zigzag"
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence` over the context-parallel group (not differentiable)."""
    if groups.cp_group is None:
        raise ValueError("gather_sequence needs groups.cp_group (as init_usp_groups builds)")
    shards = [torch.empty_like(x_local) for _ in range(groups.cp_size)]
    dist.all_gather(shards, x_local.contiguous(), group=groups.cp_group)
    seq_len = x_local.shape[dim] * groups.cp_size
    shape = list(x_local.shape)
    shape[dim] = seq_len
    full = x_local.new_empty(shape)
    for cp_rank, shard in enumerate(shards):
        positions = rank_positions(seq_len, groups, ring_impl, cp_rank).to(x_local.device)
        full.index_copy_(dim, positions, shard)
    return full
