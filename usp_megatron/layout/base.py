"""The protocol every sequence layout answers, and the all-to-all's placement of pieces.

Letters as in the package docstring: a rank holds ``s`` of the ``S`` tokens, a ring rank
``U*s`` after the all-to-all (its *ring block*).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from usp_megatron.checks import Window, check_degrees
from usp_megatron.mask import BlockTask


class UlyssesPlacement:
    """Where the ulysses all-to-all puts what it receives: the ``U`` shards of a ulysses
    group, reordered into their ring block (position order).

    Exactly one of two forms:

    - ``slots``: each shard is ``pieces`` equal contiguous pieces, and piece ``i`` of
      ulysses rank ``u`` fills slot ``slots[i][u]`` of the ring block's ``U * pieces``
      equal slots. The all-to-all receives every piece straight into its slot (dense
      layouts: no copy after it).
    - ``rows``: row ``t`` of rank ``u``'s shard is ring-block row ``rows[u * s + t]``
      (packed documents, whose pieces differ in length document by document): received
      rank by rank into a staging buffer, then put in place by one index copy.
    """

    def __init__(
        self,
        pieces: int = 1,
        slots: tuple[tuple[int, ...], ...] | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        if (slots is None) == (rows is None):
            raise ValueError("a placement has either slots or rows")
        self.pieces, self.slots, self.rows = pieces, slots, rows
        self._rows_on: dict[torch.device, torch.Tensor] = {}

    @property
    def into_slots(self) -> bool:
        return self.slots is not None

    @property
    def takes_uneven_heads(self) -> bool:
        """Uneven head splits send pieces of different sizes per rank: only the slotted
        form moves those (the staged one is one equal-split collective)."""
        return self.into_slots

    def rows_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`rows` on ``device``, copied there once."""
        if device not in self._rows_on:
            self._rows_on[device] = self.rows.to(device)
        return self._rows_on[device]


class SequenceLayout(abc.ABC):
    """How a sequence is spread over ``U x R`` ranks: the one place that answers which
    positions a rank holds (batch split, RoPE, sharding), how the all-to-all places what
    it receives, which rows of two ring blocks attend each other with which mask (the
    ring), whether it is Megatron's own split, and which sequence lengths it accepts.

    Dense layouts (``layout.dense``) and packed documents (``layout.packed``) implement
    every abstract method; block tasks and ring steps are computed once per layout (every
    layer of a model asks the same)."""

    name: ClassVar[str]
    #: Exactly Megatron's context-parallel split: its batch split and RoPE slice apply.
    megatron_split: ClassVar[bool] = False
    #: How many contiguous pieces of the ring block one rank's shard consists of.
    pieces_per_rank: ClassVar[int] = 1
    #: Whether sliding windows (``BlockMask`` bands) are defined on this layout.
    takes_windows: ClassVar[bool] = True
    #: Whether packed documents split as this layout does (:meth:`packed` gives them).
    takes_documents: ClassVar[bool] = False
    #: Whether its block masks carry documents (the kernel must take ``Documents``).
    masks_documents: ClassVar[bool] = False

    def __init__(self, ulysses_degree: int, ring_degree: int) -> None:
        check_degrees(ulysses_degree, ring_degree)
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self._tasks: dict[tuple, tuple[BlockTask, ...]] = {}
        self._steps: dict[tuple, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(U={self.ulysses_degree}, R={self.ring_degree})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (
            (other.ulysses_degree, other.ring_degree) == (self.ulysses_degree, self.ring_degree)
        )

    def __hash__(self) -> int:
        return hash((type(self), self.ulysses_degree, self.ring_degree))

    @property
    def cp_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @abc.abstractmethod
    def describe(self) -> str:
        """Which positions rank ``c`` holds, in one line (for logs and banners)."""

    # -- which sequence lengths --------------------------------------------------------
    @abc.abstractmethod
    def check_seq_len(self, seq_len: int) -> None:
        """Refuse a global sequence length this layout cannot split."""

    def check_window(self, window: Window | None) -> None:
        """Refuse a sliding window where the layout has none."""
        if window is not None and not self.takes_windows:
            raise ValueError(
                f"window_size {window} with {self.name} is not supported: a document's rows in "
                "a ring block are two separate chunks, not one band; use full-length "
                "attention within each document"
            )

    # -- packed documents --------------------------------------------------------------
    def packed(
        self, cu_seqlens_padded: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> SequenceLayout:
        """The layout of packed documents split as this layout splits a sequence (reads the
        boundaries on the host once: build it once per batch). Only zigzag has one."""
        raise ValueError(
            f"packed documents (cu_seqlens) need the zigzag layout, got {self.name!r}: "
            "Megatron's THD context-parallel split is the zigzag of every document, and "
            f"{self.name!r} would mix documents' chunks across ranks with no such split"
        )

    # -- which positions a rank holds --------------------------------------------------
    def positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        """Global positions ``[s]`` (int64, in local order) of rank ``(ulysses_rank,
        ring_rank)``."""
        self.check_seq_len(seq_len)
        if not 0 <= ulysses_rank < self.ulysses_degree:
            raise ValueError(f"ulysses_rank {ulysses_rank} not in [0, {self.ulysses_degree})")
        if not 0 <= ring_rank < self.ring_degree:
            raise ValueError(f"ring_rank {ring_rank} not in [0, {self.ring_degree})")
        return self._positions(seq_len, ulysses_rank, ring_rank)

    def positions_of_cp_rank(self, seq_len: int, cp_rank: int) -> torch.Tensor:
        """:meth:`positions` of context-parallel rank ``c = ring_rank * U + ulysses_rank``."""
        u, r = cp_rank % self.ulysses_degree, cp_rank // self.ulysses_degree
        return self.positions(seq_len, u, r)

    def ring_block_positions(self, seq_len: int, ring_rank: int) -> torch.Tensor:
        """Positions ``[U*s]`` a ring rank holds after the ulysses all-to-all, in position
        order."""
        held = [self.positions(seq_len, u, ring_rank) for u in range(self.ulysses_degree)]
        return torch.cat(held).sort().values

    @abc.abstractmethod
    def _positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        """:meth:`positions` after its checks."""

    # -- how the all-to-all places what it receives ------------------------------------
    @property
    @abc.abstractmethod
    def ulysses_placement(self) -> UlyssesPlacement:
        """Where each received piece of a shard goes in the ring block (the all-to-all's
        one question; the same for every ring rank)."""

    # -- what each ring step computes --------------------------------------------------
    def block_tasks(
        self,
        ring_rank: int,
        kv_rank: int,
        block_len: int,
        causal: bool,
        window: Window | None = None,
    ) -> tuple[BlockTask, ...]:
        """Which rows of this rank's queries (ring block ``ring_rank``) attend which rows of
        ring block ``kv_rank``, and with which mask; empty when none do. Computed once per
        layout and arguments."""
        key = (ring_rank, kv_rank, block_len, causal, window)
        if key not in self._tasks:
            self.check_window(window)
            self._tasks[key] = self._block_tasks(ring_rank, kv_rank, block_len, causal, window)
        return self._tasks[key]

    @abc.abstractmethod
    def _block_tasks(
        self, ring_rank: int, kv_rank: int, block_len: int, causal: bool, window: Window | None
    ) -> tuple[BlockTask, ...]:
        """:meth:`block_tasks`, uncached."""

    def ring_steps(self, block_len: int, causal: bool, window: Window | None = None) -> int:
        """How many steps of the ring pass any rank computes in: the steps after the last one
        some rank needs (sliding windows, short documents) are skipped, communication
        included."""
        key = (block_len, causal, window)
        if key not in self._steps:
            degree = self.ring_degree
            needed = [
                step
                for step in range(degree)
                for rank in range(degree)
                if self.block_tasks(rank, (rank - step) % degree, block_len, causal, window)
            ]
            self._steps[key] = max(needed, default=0) + 1
        return self._steps[key]
