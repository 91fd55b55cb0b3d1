"""Dense layouts: one sequence of ``S`` tokens cut into equal pieces (basic, zigzag, stripe).

Context-parallel rank ``c = ring_rank * U + ulysses_rank`` of ``C = U * R`` ranks holds:

- ``zigzag`` (default, Megatron's own context-parallel split): chunks ``c`` and
  ``2C-1-c`` of ``2C`` equal chunks, in that order. Needs ``S % (2*C) == 0``.
- ``stripe``: ring rank ``r`` owns positions ``t % R == r`` in order; ulysses rank ``u``
  holds the ``u``-th of ``U`` equal contiguous pieces of that. Needs ``S % C == 0``.
- ``basic``: contiguous chunk ``c`` of ``C``. Needs ``S % C == 0``.

Block tasks have closed forms without a window; with one, each ring block is cut into runs
of evenly spaced positions and every pair of runs gets the window's band shifted by their
position offset. The all-to-all receives every piece straight into its ring-block slot.
"""

from __future__ import annotations

import abc
import dataclasses
import functools

import torch

from usp_megatron.checks import Window
from usp_megatron.layout.base import SequenceLayout, UlyssesPlacement
from usp_megatron.layout.packed import PackedZigzagLayout, packed_zigzag_layout
from usp_megatron.mask import ALL_ROWS, CAUSAL, FULL, BlockMask, BlockTask


@dataclasses.dataclass(frozen=True)
class _Run:
    """Rows ``row .. row+length-1`` of a ring block hold positions ``position + stride*i``."""

    row: int
    length: int
    position: int
    stride: int


def _rows(start: int, stop: int, block_len: int) -> slice:
    return ALL_ROWS if (start, stop) == (0, block_len) else slice(start, stop)


def _band_task(
    queries: _Run, keys: _Run, lo: int | None, hi: int | None, block_len: int
) -> BlockTask | None:
    """The block task of two runs of equal stride when key ``j`` is visible to query ``i``
    iff ``lo <= position(j) - position(i) <= hi``: rows and columns that see or are seen by
    nothing are trimmed away; None when nothing is visible."""
    stride, delta = queries.stride, keys.position - queries.position
    nq, nk = queries.length, keys.length
    # In row numbers: lo <= delta + stride * (j - i) <= hi, for 0 <= i < nq, 0 <= j < nk.
    first = -(nq - 1) if lo is None else max(-(nq - 1), -((delta - lo) // stride))
    last = nk - 1 if hi is None else min(nk - 1, (hi - delta) // stride)
    if first > last:
        return None
    i0, i1 = max(0, -last), min(nq - 1, nk - 1 - first)  # rows that see a key
    j0, j1 = max(0, first), min(nk - 1, nq - 1 + last)  # keys that are seen
    first, last = first - j0 + i0, last - j0 + i0
    mask = BlockMask(
        lo=None if first <= -(i1 - i0) else first, hi=None if last >= j1 - j0 else last
    )
    return BlockTask(
        _rows(queries.row + i0, queries.row + i1 + 1, block_len),
        _rows(keys.row + j0, keys.row + j1 + 1, block_len),
        mask,
    )


class DenseLayout(SequenceLayout):
    """A layout of one sequence of ``S`` tokens cut into equal pieces: closed-form block
    tasks, windows through runs of evenly spaced positions, and an all-to-all that receives
    every piece straight into its ring-block slot."""

    # -- which sequence lengths --------------------------------------------------------
    @property
    def sequence_multiple(self) -> int:
        """The number the global sequence length must be a multiple of."""
        return self.pieces_per_rank * self.cp_size

    def check_seq_len(self, seq_len: int) -> None:
        multiple = self.sequence_multiple
        if seq_len <= 0 or seq_len % multiple != 0:
            need = "2 * U * R" if self.pieces_per_rank == 2 else "U * R"
            raise ValueError(
                f"sequence length {seq_len} must be a positive multiple of {need} = {multiple} "
                f"for the {self.name} layout with ulysses_degree={self.ulysses_degree}, "
                f"ring_degree={self.ring_degree}"
            )

    # -- where the all-to-all puts what it receives ------------------------------------
    @functools.cached_property
    def gather_order(self) -> list[int]:
        """Entry ``j``: the gathered piece ``u * pieces_per_rank + i`` (piece ``i`` of ulysses
        rank ``u``) that goes to slot ``j`` of the ring block, which puts it in position order.
        Derived from :meth:`positions`; the same for every ring rank and sequence length."""
        k = self.pieces_per_rank
        one_ring = type(self)(self.ulysses_degree, 1)
        seq_len = one_ring.sequence_multiple  # the smallest length with this layout
        starts = [
            int(piece[0])
            for u in range(self.ulysses_degree)
            for piece in one_ring.positions(seq_len, u, 0).chunk(k)
        ]
        return sorted(range(len(starts)), key=starts.__getitem__)

    @functools.cached_property
    def ulysses_placement(self) -> UlyssesPlacement:
        """Piece ``i`` of ulysses rank ``u`` fills slot ``slots[i][u]``."""
        k = self.pieces_per_rank
        slot_of = {piece: j for j, piece in enumerate(self.gather_order)}
        slots = tuple(
            tuple(slot_of[u * k + i] for u in range(self.ulysses_degree)) for i in range(k)
        )
        return UlyssesPlacement(pieces=k, slots=slots)

    # -- what each ring step computes --------------------------------------------------
    def _block_tasks(
        self, ring_rank: int, kv_rank: int, block_len: int, causal: bool, window: Window | None
    ) -> tuple[BlockTask, ...]:
        """Without a window each layout has a closed form (one task, or none). With a window
        (``checks.check_window``) the blocks are cut into runs of evenly spaced positions
        and every pair of runs gets the band of the window shifted by the runs' position
        offset."""
        if window is not None:
            return self._windowed_tasks(ring_rank, kv_rank, block_len, causal, window)
        if not causal:
            return (BlockTask(ALL_ROWS, ALL_ROWS, FULL),)
        if kv_rank == ring_rank:
            return (BlockTask(ALL_ROWS, ALL_ROWS, CAUSAL),)
        return self._causal_off_diagonal(kv_rank < ring_rank, block_len)

    def _windowed_tasks(
        self, ring_rank: int, kv_rank: int, block_len: int, causal: bool, window: Window
    ) -> tuple[BlockTask, ...]:
        left, right = window
        lo = None if left < 0 else -left
        hi = None if right < 0 else right
        if causal:
            hi = 0 if hi is None else min(hi, 0)
        tasks = (
            _band_task(queries, keys, lo, hi, block_len)
            for queries in self._runs(ring_rank, block_len)
            for keys in self._runs(kv_rank, block_len)
        )
        return tuple(task for task in tasks if task is not None)

    @abc.abstractmethod
    def _causal_off_diagonal(self, earlier: bool, block_len: int) -> tuple[BlockTask, ...]:
        """The causal task of an earlier (``earlier``) or later ring block than the queries'."""

    @abc.abstractmethod
    def _runs(self, ring_rank: int, block_len: int) -> list[_Run]:
        """The ring block of ``ring_rank`` as runs of evenly spaced positions."""


class BasicLayout(DenseLayout):
    """Contiguous chunks: earlier ring blocks are wholly visible, later ones not at all."""

    name = "basic"

    def describe(self) -> str:
        return f"rank c holds contiguous chunk c of {self.cp_size}"

    def _positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        piece = seq_len // self.cp_size
        start = (ring_rank * self.ulysses_degree + ulysses_rank) * piece
        return torch.arange(start, start + piece)

    def _causal_off_diagonal(self, earlier: bool, block_len: int) -> tuple[BlockTask, ...]:
        return (BlockTask(ALL_ROWS, ALL_ROWS, FULL),) if earlier else ()

    def _runs(self, ring_rank: int, block_len: int) -> list[_Run]:
        return [_Run(0, block_len, ring_rank * block_len, 1)]


class ZigzagLayout(DenseLayout):
    """Chunks ``c`` and ``2C-1-c`` of ``2C``; ``S = 16``, ``U = 2``, ``R = 2`` (``C = 4``)::

        position    0  1 |  2  3 |  4  5 |  6  7 |  8  9 | 10 11 | 12 13 | 14 15
        chunk         0  |    1  |    2  |    3  |    4  |    5  |    6  |    7
        cp rank c     0  |    1  |    2  |    3  |    3  |    2  |    1  |    0
        ring rank     0  |    0  |    1  |    1  |    1  |    1  |    0  |    0

    After the all-to-all, ring rank ``r`` holds chunks ``r`` and ``2R-1-r`` of ``2R`` (ring
    block 0: positions 0-3 and 12-15), the zigzag of an ``R``-rank ring. An earlier
    block's first half is visible to every query; a later block is wholly visible to the
    second half of the queries. Every rank does the same work at every step: the load
    balance. Packed documents split as the zigzag of every document (:meth:`packed`)."""

    name = "zigzag"
    megatron_split = True
    pieces_per_rank = 2
    takes_documents = True

    def describe(self) -> str:
        chunks = 2 * self.cp_size
        return f"rank c holds chunks c and {chunks - 1}-c of {chunks} (Megatron's own split)"

    def _positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        cp_rank = ring_rank * self.ulysses_degree + ulysses_rank
        chunk = seq_len // (2 * self.cp_size)
        first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
        second_start = (2 * self.cp_size - 1 - cp_rank) * chunk
        return torch.cat([first, torch.arange(second_start, second_start + chunk)])

    def _causal_off_diagonal(self, earlier: bool, block_len: int) -> tuple[BlockTask, ...]:
        half = block_len // 2
        if earlier:
            return (BlockTask(ALL_ROWS, slice(0, half), FULL),)
        return (BlockTask(slice(half, None), ALL_ROWS, FULL),)

    def _runs(self, ring_rank: int, block_len: int) -> list[_Run]:
        half = block_len // 2
        last_chunk = 2 * self.ring_degree - 1 - ring_rank
        return [_Run(0, half, ring_rank * half, 1), _Run(half, half, last_chunk * half, 1)]

    def packed(
        self, cu_seqlens_padded: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> PackedZigzagLayout:
        return packed_zigzag_layout(
            self.ulysses_degree, self.ring_degree, cu_seqlens_padded, cu_seqlens
        )


class StripeLayout(DenseLayout):
    """Ring block ``r`` holds positions ``t % R == r``: query ``i`` sees key ``j`` of an
    earlier block when ``j <= i`` and of a later block when ``j < i``, the causal mask or
    the causal mask shifted by one row (drop the first query row and the last key row)."""

    name = "stripe"

    def describe(self) -> str:
        pieces = f", cut into {self.ulysses_degree} contiguous pieces"
        return f"ring rank r owns positions t % {self.ring_degree} == r" + (
            pieces if self.ulysses_degree > 1 else ""
        )

    def _positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        owned = torch.arange(ring_rank, seq_len, self.ring_degree)
        piece = seq_len // self.cp_size
        return owned[ulysses_rank * piece : (ulysses_rank + 1) * piece]

    def _causal_off_diagonal(self, earlier: bool, block_len: int) -> tuple[BlockTask, ...]:
        if earlier:
            return (BlockTask(ALL_ROWS, ALL_ROWS, CAUSAL),)
        if block_len == 1:
            return ()
        return (BlockTask(slice(1, None), slice(0, block_len - 1), CAUSAL),)

    def _runs(self, ring_rank: int, block_len: int) -> list[_Run]:
        return [_Run(0, block_len, ring_rank, self.ring_degree)]
