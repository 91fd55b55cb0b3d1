"""Run by test_exit.py under torchrun (4 gloo processes): forward-only USP attention, then
``destroy_process_group`` and exit, as a user's inference script does."""

from __future__ import annotations

import torch
import torch.distributed as dist

from usp_megatron import LongContextAttention, init_usp_groups, shard_sequence

COLLECTIVES = ("all_to_all", "all_to_all_single")


def forward_only() -> int:
    """U2 x R2: forward passes without backward over every layout, a window, uneven heads,
    head chunks and packed documents, each ending in an all-to-all. Returns how many
    collectives ran on gloo's worker thread (the ones that aborted the exit)."""
    calls = []
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    groups = init_usp_groups(2, 2)
    gen = torch.Generator().manual_seed(0)
    cases = [
        ("zigzag", 8, {}, 1),
        ("stripe", 8, {}, 1),
        ("basic", 8, {"window_size": (8, 0)}, 1),
        ("zigzag", 3, {}, 1),  # uneven heads
        ("zigzag", 8, {}, 2),  # head chunks
    ]
    for impl, heads, kwargs, chunks in cases:
        attn = LongContextAttention(groups, layout=impl, head_chunks=chunks)
        q, k, v = (torch.randn(1, 64, heads, 8, generator=gen) for _ in range(3))
        local = [shard_sequence(t, 1, groups, impl).requires_grad_() for t in (q, k, v)]
        attn(*local, causal=True, **kwargs)
        with torch.no_grad():
            attn(*local, causal=True, **kwargs)
    attn = LongContextAttention(groups)
    cu = torch.tensor([0, 24, 64], dtype=torch.int32)
    q, k, v = (torch.randn(1, 64, 4, 8, generator=gen) for _ in range(3))
    local = [attn.shard(t, 1, cu_seqlens_padded=cu) for t in (q, k, v)]
    attn(*local, causal=True, cu_seqlens=cu, cu_seqlens_padded=cu)
    return len(calls)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    print(f"rank {dist.get_rank()}: {forward_only()} gloo collectives", flush=True)
    dist.destroy_process_group()
