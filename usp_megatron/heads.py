"""Head arithmetic of the ulysses all-to-all: which heads each ulysses rank computes.

The lowest layer beside ``checks``: the attention, the all-to-all, the degree chooser and
the Megatron integration all ask it, and it asks nothing of them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch


class HeadRun(NamedTuple):
    """``ranks`` consecutive ulysses ranks that each receive ``heads`` consecutive heads."""

    ranks: int
    heads: int


def _largest_block(first: int, count: int, group: int) -> int:
    """The largest divisor of ``count`` such that each block of that many query heads from
    head ``first`` on lies within one key/value group of ``group`` query heads."""

    def reads_one_kv_head(size: int) -> bool:
        starts = range(first, first + count, size)
        return all(start // group == (start + size - 1) // group for start in starts)

    return max(
        size for size in range(1, count + 1) if count % size == 0 and reads_one_kv_head(size)
    )


class HeadSplit:
    """Which heads each ulysses rank computes, with GQA/MQA and any ``U <= hq``.

    Ulysses rank ``u`` computes a contiguous range of query heads: ``hq // U`` of them, one
    more on the first ``hq % U`` ranks. Its range comes in blocks of ``ratio`` query heads
    that read one key/value head each, and the rank receives that key/value head once per
    block: the kernels then see plain GQA. A key/value head read by several ranks is sent
    to each (and repeated within a rank where a block boundary splits its group);
    autograd sums the gradients of the copies back.

    The blocks are as large as the range allows (the largest divisor of the rank's query
    heads whose blocks never straddle two key/value heads). When ``U`` divides ``hq`` one
    ratio, ``gcd(hq/U, hq/hkv)``, serves every rank instead: each rank then receives
    ``lcm(hkv, U) / U`` key/value heads and the all-to-all stays one equal split.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> None:
        if not 1 <= ulysses_degree <= num_q_heads:
            raise ValueError(
                f"ulysses_degree {ulysses_degree} must be between 1 and the query heads "
                f"{num_q_heads}: every ulysses rank computes at least one head"
            )
        if num_kv_heads < 1 or num_q_heads % num_kv_heads:
            raise ValueError(
                f"query heads {num_q_heads} must be a multiple of key/value heads {num_kv_heads}"
            )
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.ulysses_degree = ulysses_degree
        group = num_q_heads // num_kv_heads  # query heads per key/value head
        base, extra = divmod(num_q_heads, ulysses_degree)
        self.even = extra == 0
        #: Query heads of each ulysses rank; rank ``u`` starts at ``sum(q_heads[:u])``.
        self.q_heads = tuple(base + (rank < extra) for rank in range(ulysses_degree))
        kv_index, first = [], 0
        for count in self.q_heads:
            ratio = math.gcd(count, group) if self.even else _largest_block(first, count, group)
            kv_index.append(tuple(head // group for head in range(first, first + count, ratio)))
            first += count
        #: The key/value heads (indices into ``k``) each ulysses rank receives, in order.
        self.kv_index = tuple(kv_index)
        self.kv_heads = tuple(len(heads) for heads in kv_index)
        self.q_runs, self.kv_runs = self._runs()
        self._sent_kv = tuple(head for heads in kv_index for head in heads)
        self._index_on: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"HeadSplit(hq={self.num_q_heads}, hkv={self.num_kv_heads}, "
            f"U={self.ulysses_degree}: query heads {self.q_heads}, key/value heads "
            f"{self.kv_heads})"
        )

    @property
    def imbalance(self) -> float:
        """Max over mean query heads per rank: how much longer the slowest rank computes."""
        return max(self.q_heads) * self.ulysses_degree / self.num_q_heads

    def _runs(self) -> tuple[list[HeadRun], list[HeadRun]]:
        """Query and key/value :class:`HeadRun` s: consecutive ranks that receive equally
        many query heads and equally many key/value heads share one run (the all-to-all
        packs a run with one copy per tensor)."""
        q_runs: list[HeadRun] = []
        kv_runs: list[HeadRun] = []
        for q_count, kv_count in zip(self.q_heads, self.kv_heads):
            if q_runs and (q_runs[-1].heads, kv_runs[-1].heads) == (q_count, kv_count):
                q_runs[-1] = HeadRun(q_runs[-1].ranks + 1, q_count)
                kv_runs[-1] = HeadRun(kv_runs[-1].ranks + 1, kv_count)
            else:
                q_runs.append(HeadRun(1, q_count))
                kv_runs.append(HeadRun(1, kv_count))
        return q_runs, kv_runs

    def replicate_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, hkv, d] -> [b, s, sum(kv_heads), d]: the key/value heads to send, in rank
        order (differentiable; a repeat of every head alike where that is what it is)."""
        sent, hkv = self._sent_kv, self.num_kv_heads
        repeat = len(sent) // hkv
        if sent == tuple(head // repeat for head in range(len(sent))):
            return x if repeat == 1 else x.repeat_interleave(repeat, dim=2)
        if x.device not in self._index_on:
            self._index_on[x.device] = torch.tensor(sent, device=x.device)
        return x.index_select(2, self._index_on[x.device])


@functools.cache
def head_split(num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> HeadSplit:
    """The :class:`HeadSplit` of these head counts (one object per combination)."""
    return HeadSplit(num_q_heads, num_kv_heads, ulysses_degree)
