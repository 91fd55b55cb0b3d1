"""USP process groups (u = c % U, r = c // U) and the shard/gather round trip."""

import pytest
from workers.group_cases import groups_of_subgroups, shard_gather_round_trip

from usp_megatron.testing import run_distributed


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (4, 1), (1, 4)])
def test_groups_inside_several_context_parallel_groups(ulysses, ring):
    """8 ranks = 2 context-parallel groups of 4; each gets its own ulysses and ring groups."""
    per_rank = run_distributed(8, groups_of_subgroups, ulysses, ring)
    for rank, got in enumerate(per_rank):
        c = rank % 4
        assert got["cp_rank"] == c
        assert (got["ulysses_rank"], got["ring_rank"]) == (c % ulysses, c // ulysses)
        run_start = got["base"] + (c // ulysses) * ulysses
        assert got["ulysses_members"] == list(range(run_start, run_start + ulysses))
        assert got["ring_members"] == [got["base"] + c % ulysses + i * ulysses for i in range(ring)]


@pytest.mark.parametrize("world_size", [4])
def test_shard_gather_round_trip(world_size):
    problems = run_distributed(world_size, shard_gather_round_trip)
    assert problems == [[] for _ in range(world_size)]
