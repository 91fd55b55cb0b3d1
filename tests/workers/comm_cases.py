"""The ulysses all-to-all halves, run inside a process world, checked exactly."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from usp_megatron import init_usp_groups, shard_sequence
from usp_megatron.comm import (
    all_to_all,
    heads_to_seq_start,
    seq_to_heads_start,
    split_heads,
)
from usp_megatron.heads import HeadRun
from usp_megatron.layout import LAYOUT_NAMES, get_layout


def _head_splits(ulysses: int) -> dict[str, list[list[HeadRun]]]:
    """Runs of two tensors: an even split (8 and 4 heads), and an uneven one whose runs
    differ between the tensors (2U-1 and U+1 heads)."""
    return {
        "even": [[HeadRun(ulysses, 8 // ulysses)], [HeadRun(ulysses, 4 // ulysses)]],
        "uneven": [
            [HeadRun(ulysses - 1, 2), HeadRun(1, 1)],
            [HeadRun(ulysses - 1, 1), HeadRun(1, 2)],
        ],
    }


def _rank_heads(runs: list[HeadRun], rank: int) -> slice:
    """The heads ``rank`` receives under ``runs``."""
    per_rank = [run.heads for run in runs for _ in range(run.ranks)]
    start = sum(per_rank[:rank])
    return slice(start, start + per_rank[rank])


def all_to_all_round_trip(dtype_name: str, head_dim: int, gloo_path: str) -> list[str]:
    """For every factorisation, impl and head split: two tensors go sequence -> heads and
    must equal the ring block's rows of this rank's heads; then heads -> sequence (packed,
    and one sequence-major tensor sent as it is) must give the shards back.
    ``gloo_path``: "point_to_point" (what gloo uses), "collectives" (what NCCL uses:
    single-tensor and list all-to-alls) or "collectives without list" (torch before 2.13)."""
    all_to_all.GLOO_COLLECTIVES = gloo_path != "point_to_point"
    if gloo_path == "collectives without list":
        all_to_all.GLOO_HAS_LIST_ALL_TO_ALL = False
    world, dtype = dist.get_world_size(), getattr(torch, dtype_name)
    problems = []
    for ulysses in (u for u in range(2, world + 1) if world % u == 0):
        ring = world // ulysses
        groups = init_usp_groups(ulysses, ring)
        u = groups.ulysses_rank
        for impl, (split, runs) in itertools.product(LAYOUT_NAMES, _head_splits(ulysses).items()):
            seq_len = 4 * world
            gen = torch.Generator().manual_seed(ulysses * 10 + len(impl))
            heads = [sum(run.ranks * run.heads for run in r) for r in runs]
            fulls = [torch.randn(2, seq_len, h, head_dim, generator=gen).to(dtype) for h in heads]
            shards = [shard_sequence(x, 1, groups, impl) for x in fulls]
            layout = get_layout(impl, ulysses, ring)
            views = [split_heads(x, r)[0] for x, r in zip(shards, runs)]
            got = seq_to_heads_start(views, layout, groups.ulysses_group).wait()
            rows = get_layout(impl, ulysses, ring).ring_block_positions(seq_len, groups.ring_rank)
            case = f"U{ulysses}R{ring} {impl} {split} {dtype_name} d={head_dim}"
            for x, r, g in zip(fulls, runs, got):
                if not torch.equal(g, x[:, rows, _rank_heads(r, u)]):
                    problems.append(f"{case}: sequence -> heads differs")
            backs = [torch.full_like(x, float("nan")) for x in shards]
            dests = [split_heads(x, r)[0] for x, r in zip(backs, runs)]
            heads_to_seq_start(got, dests, layout, groups.ulysses_group).wait()
            dense = got[0].transpose(0, 1).contiguous().transpose(0, 1)  # sent as it is
            single = torch.full_like(shards[0], float("nan"))
            pending = heads_to_seq_start(
                [dense], [split_heads(single, runs[0])[0]], layout, groups.ulysses_group
            )
            pending.wait()
            if pending.sent.data_ptr() != dense.data_ptr():
                problems.append(f"{case}: a sequence-major tensor was copied before sending")
            for name, back, want in (
                ("packed", backs[0], shards[0]),
                ("packed", backs[1], shards[1]),
                ("as it is", single, shards[0]),
            ):
                if not torch.equal(back, want):
                    problems.append(f"{case}: heads -> sequence ({name}) differs")
    if all_to_all.GLOO_COLLECTIVES:
        dist.barrier()  # gloo's worker threads let go of the last collective before exit
    return problems
