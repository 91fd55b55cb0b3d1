"""Process groups and sequence sharding, run inside a process world."""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_megatron import gather_sequence, init_usp_groups, local_positions, shard_sequence
from usp_megatron.layout import LAYOUT_NAMES


def groups_of_subgroups(ulysses: int, ring: int) -> dict:
    """World split into context-parallel groups of U*R consecutive ranks; USP inside each."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = ulysses * ring
    mine = None
    for start in range(0, world, cp):
        pg = dist.new_group(list(range(start, start + cp)))
        if start <= rank < start + cp:
            mine = pg
    groups = init_usp_groups(ulysses, ring, group=mine)
    base = rank - rank % cp
    return {
        "cp_rank": groups.cp_rank,
        "ulysses_rank": groups.ulysses_rank,
        "ring_rank": groups.ring_rank,
        "ulysses_members": dist.get_process_group_ranks(groups.ulysses_group),
        "ring_members": dist.get_process_group_ranks(groups.ring_group),
        "base": base,
    }


def shard_gather_round_trip() -> list[str]:
    """shard_sequence then gather_sequence returns the original, for every factorisation."""
    world = dist.get_world_size()
    problems = []
    for ulysses in (u for u in range(1, world + 1) if world % u == 0):
        groups = init_usp_groups(ulysses, world // ulysses)
        for impl in LAYOUT_NAMES:
            full = torch.randn(3, 8 * world, 5, generator=torch.Generator().manual_seed(world))
            local = shard_sequence(full, 1, groups, impl)
            expected_positions = local_positions(
                full.shape[1],
                ulysses,
                world // ulysses,
                groups.ulysses_rank,
                groups.ring_rank,
                impl,
            )
            if not torch.equal(local, full[:, expected_positions]):
                problems.append(f"U{ulysses} {impl}: shard is not the local positions")
            if not torch.equal(gather_sequence(local, 1, groups, impl), full):
                problems.append(f"U{ulysses} {impl}: gather does not invert shard")
    return problems
