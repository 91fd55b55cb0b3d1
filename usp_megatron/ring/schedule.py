"""Which rows of a ring block attend which rows of another, for each ring impl.

At every ring step a rank holds its own queries (ring block ``ring_rank``) and the
keys/values of ring block ``kv_rank``. The three layouts differ only here:

- basic: earlier blocks are fully visible, later ones not at all.
- zigzag (blocks are chunks ``r`` and ``2R-1-r`` of ``2R``): an earlier block's first half is
  visible to every query; a later block is fully visible to the second half of the queries.
  Every rank does the same work at every step: the load balance.
- stripe (block ``r`` holds positions ``t % R == r``): query ``i`` sees key ``j`` of an earlier
  block when ``j <= i`` and of a later block when ``j < i``: the causal mask, or the causal
  mask shifted by one row (drop the first query row and the last key row).
"""

from __future__ import annotations

from dataclasses import dataclass

_ALL = slice(None)


@dataclass(frozen=True)
class BlockTask:
    """Attend ``q[:, q_rows]`` to ``k/v[:, kv_rows]`` (square causal mask if ``causal``)."""

    q_rows: slice
    kv_rows: slice
    causal: bool


def block_task(
    ring_impl: str, causal: bool, ring_rank: int, kv_rank: int, block_len: int
) -> BlockTask | None:
    """The attention between this rank's queries and block ``kv_rank``; None if none."""
    if not causal:
        return BlockTask(_ALL, _ALL, False)
    if kv_rank == ring_rank:
        return BlockTask(_ALL, _ALL, True)
    earlier = kv_rank < ring_rank
    if ring_impl == "basic":
        return BlockTask(_ALL, _ALL, False) if earlier else None
    if ring_impl == "zigzag":
        half = block_len // 2
        if earlier:
            return BlockTask(_ALL, slice(0, half), False)
        return BlockTask(slice(half, None), _ALL, False)
    if ring_impl == "stripe":
        if earlier:
            return BlockTask(_ALL, _ALL, True)
        if block_len == 1:
            return None
        return BlockTask(slice(1, None), slice(0, block_len - 1), True)
    raise ValueError(f"unknown ring_impl {ring_impl!r}")
