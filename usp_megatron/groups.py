"""The ulysses and ring process groups of a context-parallel group.

Context-parallel rank ``c`` has ulysses rank ``u = c % U`` and ring rank ``r = c // U``:
ulysses groups are runs of ``U`` consecutive ranks (inside a node, where all-to-all is
cheap) and ring groups stride across them. This matches Megatron's
``hierarchical_context_parallel_sizes=[U, R]`` (level 0 = ulysses, level 1 = ring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from usp_megatron.checks import check_degrees


@dataclass(frozen=True)
class USPGroups:
    """Process groups and ranks of one rank's USP position."""

    ulysses_group: ProcessGroup | None
    ring_group: ProcessGroup | None
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int
    cp_group: ProcessGroup | None = None

    @property
    def cp_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def cp_rank(self) -> int:
        return self.ring_rank * self.ulysses_degree + self.ulysses_rank


def usp_groups_from(
    ulysses_group: ProcessGroup,
    ring_group: ProcessGroup,
    cp_group: ProcessGroup | None = None,
) -> USPGroups:
    """Wrap groups built elsewhere (e.g. Megatron's hierarchical context-parallel groups)."""
    groups = USPGroups(
        ulysses_group=ulysses_group,
        ring_group=ring_group,
        ulysses_degree=dist.get_world_size(ulysses_group),
        ring_degree=dist.get_world_size(ring_group),
        ulysses_rank=dist.get_rank(ulysses_group),
        ring_rank=dist.get_rank(ring_group),
        cp_group=cp_group,
    )
    if cp_group is not None:
        cp_size = dist.get_world_size(cp_group)
        if cp_size != groups.cp_size or dist.get_rank(cp_group) != groups.cp_rank:
            raise ValueError(
                f"ulysses group (size {groups.ulysses_degree}, rank {groups.ulysses_rank}) and "
                f"ring group (size {groups.ring_degree}, rank {groups.ring_rank}) do not tile "
                f"the context-parallel group (size {cp_size}, rank {dist.get_rank(cp_group)}) "
                "as c = ring_rank * U + ulysses_rank"
            )
    return groups


def _all_parent_groups(group: ProcessGroup | None) -> list[list[int]]:
    """Global ranks of every rank's parent group, the same list on every rank."""
    world = dist.get_world_size()
    if group is None or dist.get_world_size(group) == world:
        return [list(range(world))]
    mine = dist.get_process_group_ranks(group)
    everyone: list[list[int] | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    return sorted({tuple(ranks) for ranks in everyone if ranks is not None})  # type: ignore[arg-type]


def init_usp_groups(
    ulysses_degree: int, ring_degree: int, group: ProcessGroup | None = None
) -> USPGroups:
    """Build the ulysses and ring subgroups of ``group`` (default: the whole world).

    Every rank of the world must call this (``new_group`` is collective); when ``group``
    is a subgroup, each rank passes its own context-parallel group and the subgroups of
    all of them are built in one agreed order.
    """
    check_degrees(ulysses_degree, ring_degree)
    if not dist.is_initialized():
        raise RuntimeError("init_usp_groups needs torch.distributed to be initialized first")
    group_size = dist.get_world_size(group)
    if ulysses_degree * ring_degree != group_size:
        raise ValueError(
            f"ulysses_degree * ring_degree = {ulysses_degree} * {ring_degree} = "
            f"{ulysses_degree * ring_degree} must equal the group size {group_size}"
        )
    me = dist.get_rank()
    found: dict[str, ProcessGroup] = {}
    for parent in _all_parent_groups(group):
        if len(parent) != group_size:
            raise ValueError(f"context-parallel groups differ in size: {parent} vs {group_size}")
        for r in range(ring_degree):
            ranks = [parent[r * ulysses_degree + u] for u in range(ulysses_degree)]
            pg = dist.new_group(ranks)
            if me in ranks:
                found["ulysses"] = pg
        for u in range(ulysses_degree):
            ranks = [parent[r * ulysses_degree + u] for r in range(ring_degree)]
            pg = dist.new_group(ranks)
            if me in ranks:
                found["ring"] = pg
    cp_group = group if group is not None else dist.group.WORLD
    return usp_groups_from(found["ulysses"], found["ring"], cp_group)


def gather_ints(
    values: Sequence[int], group: ProcessGroup, size: int, device: torch.device
) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (a few integers, their count may differ between ranks), in
    group rank order: one small all-gather, whose reading waits for the device. What the
    checks use that compare ranks' inputs before a collective that would crash or hang
    on different ones."""
    most = 16
    if len(values) >= most:
        raise ValueError(f"gather_ints takes fewer than {most} values, got {len(values)}")
    padded = [len(values), *values, *[0] * (most - 1 - len(values))]
    mine = torch.tensor(padded, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine, group=group)
    rows = [row.tolist() for row in everyone]
    return [tuple(row[1 : 1 + row[0]]) for row in rows]
