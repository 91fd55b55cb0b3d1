"""THE sequence layout: one object per ring layout, the only place layouts differ.

Context-parallel rank ``c = ring_rank * U + ulysses_rank`` of ``C = U * R`` ranks holds:

- ``zigzag`` (default, Megatron's own context-parallel split): chunks ``c`` and
  ``2C-1-c`` of ``2C`` equal chunks, in that order. Needs ``S % (2*C) == 0``.
- ``stripe``: ring rank ``r`` owns positions ``t % R == r`` in order; ulysses rank ``u``
  holds the ``u``-th of ``U`` equal contiguous pieces of that. Needs ``S % C == 0``.
- ``basic``: contiguous chunk ``c`` of ``C``. Needs ``S % C == 0``.
- packed documents (THD, ``PackedZigzagLayout``, built by ``packed_layout``): the zigzag
  of every document, documents in order (Megatron's THD context-parallel split).

After the ulysses all-to-all a ring rank holds its *ring block*: the union of its
ulysses group's positions, sorted. A layout object answers every question that depends
on the layout: the positions a rank holds (batch split, RoPE, sharding), the ring-block
slot each received piece goes to (the all-to-all), which rows of two ring blocks attend
each other with which mask (the ring), whether it is Megatron's own split, and which
sequence lengths it accepts. Nothing outside this module compares layout names.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import ClassVar

import torch

from usp_megatron.checks import Window, check_degrees
from usp_megatron.mask import ALL_ROWS, CAUSAL, FULL, BlockMask, BlockTask, Documents


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


class SequenceLayout(abc.ABC):
    """How a sequence is spread over ``U x R`` ranks: the protocol the batch split, RoPE,
    sharding, the all-to-all and the ring ask (see the module doc). Dense layouts
    (:class:`DenseLayout`) and packed documents (:class:`PackedZigzagLayout`) implement
    every abstract method; the block tasks and ring steps are computed once per layout."""

    name: ClassVar[str]
    #: Exactly Megatron's context-parallel split: its batch split and RoPE slice apply.
    megatron_split: ClassVar[bool] = False
    #: How many contiguous-in-the-ring-block pieces one rank's shard consists of.
    pieces_per_rank: ClassVar[int] = 1
    #: Whether sliding windows (``BlockMask`` bands) are defined on this layout.
    takes_windows: ClassVar[bool] = True
    #: How the ulysses all-to-all moves pieces: True, each received piece lands straight
    #: in its ring-block slot (:attr:`DenseLayout.gather_slots`); False, pieces are received
    #: rank by rank and reordered by :meth:`PackedZigzagLayout.staging_rows_on`.
    receives_into_slots: ClassVar[bool] = True
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

    # -- which positions a rank holds --------------------------------------------------
    def positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        """Global positions (1-D int64, in local order) of rank ``(ulysses_rank, ring_rank)``."""
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
        """Positions a ring rank holds after the ulysses all-to-all, in position order."""
        held = [self.positions(seq_len, u, ring_rank) for u in range(self.ulysses_degree)]
        return torch.cat(held).sort().values

    @abc.abstractmethod
    def _positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        """:meth:`positions` after its checks."""

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
        layout and arguments (every layer of a model asks the same)."""
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


class DenseLayout(SequenceLayout):
    """A layout of one sequence of ``S`` tokens cut into equal pieces (basic, zigzag,
    stripe): closed-form block tasks, windows through runs of evenly spaced positions, and
    an all-to-all that receives every piece straight into its ring-block slot."""

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
                f"for ring_impl={self.name!r} with ulysses_degree={self.ulysses_degree}, "
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
    def gather_slots(self) -> list[list[int]]:
        """``gather_slots[i][u]``: the ring-block slot of piece ``i`` of ulysses rank ``u``."""
        k = self.pieces_per_rank
        slot_of = {piece: j for j, piece in enumerate(self.gather_order)}
        return [[slot_of[u * k + i] for u in range(self.ulysses_degree)] for i in range(k)]

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

    def _positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        piece = seq_len // self.cp_size
        start = (ring_rank * self.ulysses_degree + ulysses_rank) * piece
        return torch.arange(start, start + piece)

    def _causal_off_diagonal(self, earlier: bool, block_len: int) -> tuple[BlockTask, ...]:
        return (BlockTask(ALL_ROWS, ALL_ROWS, FULL),) if earlier else ()

    def _runs(self, ring_rank: int, block_len: int) -> list[_Run]:
        return [_Run(0, block_len, ring_rank * block_len, 1)]


class ZigzagLayout(DenseLayout):
    """Chunks ``c`` and ``2C-1-c`` of ``2C``: ring block ``r`` is chunks ``r`` and ``2R-1-r``
    of ``2R``. An earlier block's first half is visible to every query; a later block is
    wholly visible to the second half of the queries. Every rank does the same work at
    every step: the load balance."""

    name = "zigzag"
    megatron_split = True
    pieces_per_rank = 2

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


class StripeLayout(DenseLayout):
    """Ring block ``r`` holds positions ``t % R == r``: query ``i`` sees key ``j`` of an
    earlier block when ``j <= i`` and of a later block when ``j < i``, the causal mask or
    the causal mask shifted by one row (drop the first query row and the last key row)."""

    name = "stripe"

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


class PackedZigzagLayout(SequenceLayout):
    """Packed documents (THD): exactly Megatron's THD context-parallel split
    (TransformerEngine's ``thd_get_partitioned_indices``).

    Document ``n`` spans ``cu_seqlens_padded[n] .. cu_seqlens_padded[n+1]``, a multiple of
    ``2C`` long; its real tokens are the first ``cu_seqlens[n+1] - cu_seqlens[n]``, the
    rest padding. Rank ``c`` holds chunks ``c`` and ``2C-1-c`` of the ``2C`` chunks of every
    document, documents in order. Ring block ``r`` is then, per document, its chunks ``r``
    and ``2R-1-r`` of ``2R`` (``A_n``, ``B_n``), in position order ``A_1 B_1 A_2 B_2 ..``:
    each document's rows are contiguous and its real rows a prefix of them, so every ring
    step is one block task over all documents (``mask.Documents``): the diagonal is causal
    per document; an earlier block's ``A'_n`` is wholly visible to ``A_n B_n``; a later
    block's ``A'_n B'_n`` is wholly visible to ``B_n``. Padding sees and is seen by nothing.
    """

    name = "packed documents"
    megatron_split = True
    pieces_per_rank = 2
    takes_windows = False
    receives_into_slots = False
    masks_documents = True

    def __init__(
        self,
        ulysses_degree: int,
        ring_degree: int,
        cu_seqlens_padded: tuple[int, ...],
        cu_seqlens: tuple[int, ...],
    ) -> None:
        super().__init__(ulysses_degree, ring_degree)
        self.cu_seqlens_padded, self.cu_seqlens = tuple(cu_seqlens_padded), tuple(cu_seqlens)
        padded = [b - a for a, b in zip(self.cu_seqlens_padded, self.cu_seqlens_padded[1:])]
        real = [b - a for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:])]
        self.padded_lens, self.real_lens = tuple(padded), tuple(real)
        #: The longest document, padded and real (RoPE's table must hold the real one).
        self.longest_padded, self.longest_real = max(padded, default=0), max(real, default=0)
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(U={self.ulysses_degree}, R={self.ring_degree}, "
            f"cu_seqlens_padded={self.cu_seqlens_padded}, cu_seqlens={self.cu_seqlens})"
        )

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and (other.cu_seqlens_padded, other.cu_seqlens) == (
            self.cu_seqlens_padded,
            self.cu_seqlens,
        )

    def __hash__(self) -> int:
        return hash((super().__hash__(), self.cu_seqlens_padded, self.cu_seqlens))

    @property
    def seq_len(self) -> int:
        return self.cu_seqlens_padded[-1]

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise ValueError(
                f"sequence length {seq_len} must equal cu_seqlens_padded[-1] = {self.seq_len} "
                "for packed documents"
            )

    def _positions(self, seq_len: int, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        cp_rank, chunks = ring_rank * self.ulysses_degree + ulysses_rank, 2 * self.cp_size
        pieces = []
        for start, length in zip(self.cu_seqlens_padded, self.padded_lens):
            chunk = length // chunks
            for index in (cp_rank, chunks - 1 - cp_rank):
                pieces.append(torch.arange(start + index * chunk, start + (index + 1) * chunk))
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)

    @functools.cached_property
    def staging_rows(self) -> torch.Tensor:
        """Entry ``u * s_local + t``: the ring-block row of local token ``t`` of ulysses rank
        ``u`` (the all-to-all receives rank by rank, then copies rows by this index). The
        same for every ring rank."""
        block = self.ring_block_positions(self.seq_len, 0)
        held = torch.cat([self.positions(self.seq_len, u, 0) for u in range(self.ulysses_degree)])
        return torch.searchsorted(block, held)

    def staging_rows_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`staging_rows` on ``device``, copied there once."""
        return self._copy_on(device, "staging_rows", self.staging_rows)

    def document_positions(self, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        """The position of each local token inside its own (padded) document, in local
        order: the rotary-table row of each token (Megatron's THD RoPE counts from 0 in
        every document)."""
        held = self.positions(self.seq_len, ulysses_rank, ring_rank)
        starts = torch.tensor(self.cu_seqlens_padded[:-1], dtype=torch.int64)
        document = torch.searchsorted(starts, held, right=True) - 1
        return held - starts[document]

    def document_positions_on(
        self, device: torch.device, ulysses_rank: int, ring_rank: int
    ) -> torch.Tensor:
        """:meth:`document_positions` on ``device``, copied there once per layout."""
        key = f"document_positions {ulysses_rank} {ring_rank}"
        if (key, device) not in self._on_device:
            self._copy_on(device, key, self.document_positions(ulysses_rank, ring_rank))
        return self._on_device[key, device]

    def _copy_on(self, device: torch.device, key: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` on ``device``, copied there the first time only."""
        if (key, device) not in self._on_device:
            self._on_device[key, device] = value.to(device)
        return self._on_device[key, device]

    def _halves(self, ring_rank: int) -> list[tuple[int, int, int, int]]:
        """Per document: (first row in the ring block, rows per half, real rows of ``A_n``,
        real rows of ``B_n``)."""
        degree, row, halves = self.ring_degree, 0, []
        for padded, real in zip(self.padded_lens, self.real_lens):
            half = padded // (2 * degree)
            real_a = min(max(real - ring_rank * half, 0), half)
            real_b = min(max(real - (2 * degree - 1 - ring_rank) * half, 0), half)
            halves.append((row, half, real_a, real_b))
            row += 2 * half
        return halves

    def _block_tasks(
        self, ring_rank: int, kv_rank: int, block_len: int, causal: bool, window: Window | None
    ) -> tuple[BlockTask, ...]:
        """One task over every document with rows on both sides (see the class doc); none
        when no document has."""
        return self._document_tasks(ring_rank, kv_rank, causal)

    def _document_tasks(self, ring_rank: int, kv_rank: int, causal: bool) -> tuple[BlockTask, ...]:
        segments = []
        queries, keys = self._halves(ring_rank), self._halves(kv_rank)
        for (row, half, qa, qb), (_, _, ka, kb) in zip(queries, keys):
            if not causal or kv_rank <= ring_rank:  # A_n B_n (real prefix) query
                q_start, q_len = row, qa + qb
            else:  # later block: only B_n comes after it
                q_start, q_len = row + half, qb
            if causal and kv_rank < ring_rank:  # earlier block: only A'_n comes before
                k_len = ka
            else:
                k_len = ka + kb
            if q_len and k_len:
                segments.append((q_start, q_len, row, k_len))
        if not segments:
            return ()
        q_starts, q_lens, k_starts, k_lens = zip(*segments)
        documents = Documents(q_starts, q_lens, k_starts, k_lens, causal and kv_rank == ring_rank)
        return (BlockTask(ALL_ROWS, ALL_ROWS, BlockMask(documents=documents)),)


def _cu_seqlens_tuple(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D integer tensor [num_docs + 1], got "
            f"{value if not isinstance(value, torch.Tensor) else (value.dtype, tuple(value.shape))}"
        )
    cu = tuple(int(x) for x in value.tolist())
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(
            f"{name} must start at 0, be non-decreasing and have >= 2 entries, got {cu}"
        )
    return cu


def check_packs_documents(ring_impl: str) -> None:
    """Packed documents split as Megatron's THD split, the zigzag of every document."""
    if layout_type(ring_impl) is not ZigzagLayout:
        raise ValueError(
            f"packed documents (cu_seqlens) need ring_impl='zigzag', got {ring_impl!r}: "
            "Megatron's THD context-parallel split is the zigzag of every document, and "
            f"{ring_impl!r} would mix documents' chunks across ranks with no such split"
        )


def packed_layout(
    ring_impl: str,
    ulysses_degree: int,
    ring_degree: int,
    cu_seqlens_padded: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> PackedZigzagLayout:
    """The packed-documents layout of these document boundaries, validated.

    ``cu_seqlens_padded``: int tensor ``[num_docs + 1]``, each document's padded length a
    multiple of ``2 * U * R``; ``cu_seqlens``: the real lengths (None: no padding).
    Global and the same on every rank (read once, on the host).
    """
    check_packs_documents(ring_impl)
    check_degrees(ulysses_degree, ring_degree)
    padded = _cu_seqlens_tuple("cu_seqlens_padded", cu_seqlens_padded)
    real = padded if cu_seqlens is None else _cu_seqlens_tuple("cu_seqlens", cu_seqlens)
    multiple = 2 * ulysses_degree * ring_degree
    if len(real) != len(padded):
        raise ValueError(
            f"cu_seqlens has {len(real)} entries but cu_seqlens_padded {len(padded)}: one "
            "per document boundary in both"
        )
    for n, (a, b, ra, rb) in enumerate(zip(padded, padded[1:], real, real[1:])):
        if (b - a) % multiple:
            raise ValueError(
                f"document {n} has padded length {b - a} (cu_seqlens_padded={padded}); every "
                f"padded length must be a multiple of 2 * U * R = {multiple}"
            )
        if rb - ra > b - a:
            raise ValueError(
                f"document {n} has real length {rb - ra} > its padded length {b - a} "
                f"(cu_seqlens={real}, cu_seqlens_padded={padded})"
            )
    if padded[-1] == 0:
        raise ValueError(f"cu_seqlens_padded {padded} holds no tokens")
    return _packed_zigzag_layout(ulysses_degree, ring_degree, padded, real)


@functools.lru_cache(maxsize=64)
def _packed_zigzag_layout(
    ulysses_degree: int, ring_degree: int, padded: tuple[int, ...], real: tuple[int, ...]
) -> PackedZigzagLayout:
    """One layout object per packing: every layer of a model (and the batch split) asks for
    the same one, whose block tasks and all-to-all index are then computed once."""
    return PackedZigzagLayout(ulysses_degree, ring_degree, padded, real)


LAYOUTS: dict[str, type[SequenceLayout]] = {
    cls.name: cls for cls in (BasicLayout, ZigzagLayout, StripeLayout)
}
RING_IMPLS = tuple(LAYOUTS)


def layout_type(ring_impl: str) -> type[SequenceLayout]:
    """The layout class of ``ring_impl``, for questions that need no degrees."""
    if ring_impl not in LAYOUTS:
        raise ValueError(f"ring_impl must be one of {RING_IMPLS}, got {ring_impl!r}")
    return LAYOUTS[ring_impl]


def check_ring_impl(ring_impl: str) -> None:
    layout_type(ring_impl)


@functools.lru_cache(maxsize=None, typed=True)
def get_layout(ring_impl: str, ulysses_degree: int, ring_degree: int) -> SequenceLayout:
    """The layout object of ``ring_impl`` over ``ulysses_degree x ring_degree`` ranks."""
    return layout_type(ring_impl)(ulysses_degree, ring_degree)


def local_positions(
    seq_len: int,
    ulysses_degree: int,
    ring_degree: int,
    ulysses_rank: int,
    ring_rank: int,
    layout: LayoutArg,
    cu_seqlens_padded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global positions (1-D int64, in local order) held by rank ``(ulysses_rank, ring_rank)``
    under ``layout`` (an object or a ``ring_impl`` name); with ``cu_seqlens_padded`` those
    of packed documents (``PackedZigzagLayout``)."""
    resolved = resolve_layout(layout, ulysses_degree, ring_degree, cu_seqlens_padded)
    return resolved.positions(seq_len, ulysses_rank, ring_rank)


def check_seq_len(seq_len: int, ulysses_degree: int, ring_degree: int, ring_impl: str) -> None:
    get_layout(ring_impl, ulysses_degree, ring_degree).check_seq_len(seq_len)


def ring_block_positions(
    seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, ring_impl: str
) -> torch.Tensor:
    """Positions a ring rank holds after the ulysses all-to-all, in position order."""
    return get_layout(ring_impl, ulysses_degree, ring_degree).ring_block_positions(
        seq_len, ring_rank
    )


LayoutArg = SequenceLayout | str


def resolve_layout(
    layout: LayoutArg,
    ulysses_degree: int,
    ring_degree: int,
    cu_seqlens_padded: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> SequenceLayout:
    """The layout object of what a caller passes, checked against the degrees it runs on.

    ``layout``: a layout object (as the attention module, the batch split or
    :func:`packed_layout` made it; the object itself is the currency: pass it on), or a
    ``ring_impl`` name (``'zigzag'``, ``'stripe'``, ``'basic'``), with the packed document
    boundaries where there are any.
    """
    if isinstance(layout, str):
        if cu_seqlens_padded is not None or cu_seqlens is not None:
            padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
            return packed_layout(layout, ulysses_degree, ring_degree, padded, cu_seqlens)
        return get_layout(layout, ulysses_degree, ring_degree)
    if not isinstance(layout, SequenceLayout):
        raise ValueError(f"layout must be a layout object or one of {RING_IMPLS}, got {layout!r}")
    if (layout.ulysses_degree, layout.ring_degree) != (ulysses_degree, ring_degree):
        raise ValueError(
            f"{layout!r} is for ulysses degree {layout.ulysses_degree} x ring degree "
            f"{layout.ring_degree}, but the groups are {ulysses_degree} x {ring_degree}"
        )
    if cu_seqlens_padded is not None and not layout.masks_documents:
        raise ValueError(
            f"cu_seqlens_padded was given with the dense layout {layout!r}: pass the packed "
            "layout of those documents (packed_layout) or a ring_impl name"
        )
    return layout
