"""Packed documents (THD): many documents in one sequence, split as Megatron splits them.

Built from the zigzag layout (``ZigzagLayout.packed``), once per batch: the boundaries
are read on the host once, and the block tasks and the all-to-all index are computed once
for every layer.
"""

from __future__ import annotations

import functools

import torch

from usp_megatron.checks import Window, check_degrees
from usp_megatron.layout.base import SequenceLayout, UlyssesPlacement
from usp_megatron.mask import ALL_ROWS, BlockMask, BlockTask, Documents


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

    def describe(self) -> str:
        chunks = 2 * self.cp_size
        return (
            f"rank c holds chunks c and {chunks - 1}-c of {chunks} of each of "
            f"{len(self.padded_lens)} documents (Megatron's THD split)"
        )

    @property
    def seq_len(self) -> int:
        return self.cu_seqlens_padded[-1]

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise ValueError(
                f"sequence length {seq_len} must equal cu_seqlens_padded[-1] = {self.seq_len} "
                "for packed documents"
            )

    def packed(
        self, cu_seqlens_padded: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> SequenceLayout:
        raise ValueError(
            f"{self!r} already holds packed documents: build other documents' layout from "
            "the dense zigzag layout"
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
    def ulysses_placement(self) -> UlyssesPlacement:
        """Entry ``u * s + t`` of ``rows``: the ring-block row of local token ``t`` of ulysses
        rank ``u`` (the same for every ring rank)."""
        block = self.ring_block_positions(self.seq_len, 0)
        held = torch.cat([self.positions(self.seq_len, u, 0) for u in range(self.ulysses_degree)])
        return UlyssesPlacement(pieces=self.pieces_per_rank, rows=torch.searchsorted(block, held))

    def document_positions(self, ulysses_rank: int, ring_rank: int) -> torch.Tensor:
        """The position ``[s]`` of each local token inside its own (padded) document, in
        local order: the rotary-table row of each token (Megatron's THD RoPE counts from 0
        in every document)."""
        held = self.positions(self.seq_len, ulysses_rank, ring_rank)
        starts = torch.tensor(self.cu_seqlens_padded[:-1], dtype=torch.int64)
        document = torch.searchsorted(starts, held, right=True) - 1
        return held - starts[document]

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


def packed_zigzag_layout(
    ulysses_degree: int,
    ring_degree: int,
    cu_seqlens_padded: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> PackedZigzagLayout:
    """The packed-documents layout of these document boundaries, validated (what
    ``ZigzagLayout.packed`` returns).

    ``cu_seqlens_padded``: int tensor ``[num_docs + 1]``, each document's padded length a
    multiple of ``2 * U * R``; ``cu_seqlens``: the real lengths (None: no padding).
    Global and the same on every rank (read once, on the host).
    """
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
    return _cached_layout(ulysses_degree, ring_degree, padded, real)


@functools.lru_cache(maxsize=64)
def _cached_layout(
    ulysses_degree: int, ring_degree: int, padded: tuple[int, ...], real: tuple[int, ...]
) -> PackedZigzagLayout:
    """One layout object per packing: every layer of a model (and the batch split) asks for
    the same one, whose block tasks and all-to-all index are then computed once."""
    return PackedZigzagLayout(ulysses_degree, ring_degree, padded, real)
