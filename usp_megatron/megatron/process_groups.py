"""This rank's USP groups, read from the groups Megatron already built.

Megatron builds them in ``initialize_model_parallel(context_parallel_size=U*R,
hierarchical_context_parallel_sizes=[U, R])``: level 0 of the hierarchical
context-parallel groups is the ulysses group, level 1 the ring group. They are read when a
module is built, never in forward: with pipeline parallelism not every rank builds every
layer, and building groups is a collective that every rank must join.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state

from usp_megatron.groups import USPGroups, usp_groups_from

HOW_TO_BUILD = (
    "initialize_model_parallel(context_parallel_size=U*R, "
    "hierarchical_context_parallel_sizes=[U, R]) (Megatron-LM: --usp-ulysses-degree U "
    "--usp-ring-degree R)"
)


def usp_groups_from_megatron(pg_collection: Any = None) -> USPGroups:
    """USP groups of this rank from ``pg_collection`` (``cp``, ``hcp``) or ``parallel_state``."""
    cp_group = getattr(pg_collection, "cp", None)
    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
    if cp_group is None:
        raise ValueError(
            f"no context-parallel group: build the model parallel groups first with {HOW_TO_BUILD}"
        )
    if cp_group.size() == 1:
        # One rank: the context-parallel group itself serves as both (size-1) groups.
        return usp_groups_from(cp_group, cp_group, cp_group)
    levels = getattr(pg_collection, "hcp", None)
    if levels is None:
        levels = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    if levels is None or len(levels) != 2:
        found = "none" if levels is None else f"{len(levels)} levels"
        raise ValueError(
            f"USP needs two hierarchical context-parallel groups [ulysses, ring] for "
            f"context-parallel size {cp_group.size()}, found {found}: build them with "
            f"{HOW_TO_BUILD}"
        )
    cp_ranks = set(dist.get_process_group_ranks(cp_group))
    for level in levels:
        if not set(dist.get_process_group_ranks(level)) <= cp_ranks:
            raise ValueError(
                f"hierarchical context-parallel group {dist.get_process_group_ranks(level)} is "
                f"not inside this rank's context-parallel group {sorted(cp_ranks)}: groups "
                "left from an earlier initialize_model_parallel? (destroy_model_parallel does "
                "not reset them)"
            )
    return usp_groups_from(levels[0], levels[1], cp_group)


def reset_model_parallel() -> None:
    """``parallel_state.destroy_model_parallel`` that also forgets the hierarchical groups.

    megatron-core's ``destroy_model_parallel`` (0.16 to 0.19) leaves the hierarchical
    context-parallel groups set, so a second ``initialize_model_parallel`` in the same
    process (a new layout) would hand the plugin the old ulysses and ring groups.
    """
    parallel_state.destroy_model_parallel()
    parallel_state._HIERARCHICAL_CONTEXT_PARALLEL_GROUPS = None
