"""THE sequence layout: which global token positions each rank holds.

Context-parallel rank ``c = ring_rank * U + ulysses_rank`` of ``C = U * R`` ranks holds:

- ``zigzag`` (default, Megatron's own context-parallel split): chunks ``c`` and
  ``2C-1-c`` of ``2C`` equal chunks, in that order. Needs ``S % (2*C) == 0``.
- ``stripe``: ring rank ``r`` owns positions ``t % R == r`` in order; ulysses rank ``u``
  holds the ``u``-th of ``U`` equal contiguous pieces of that. Needs ``S % C == 0``.
- ``basic``: contiguous chunk ``c`` of ``C``. Needs ``S % C == 0``.

After the ulysses all-to-all a ring rank holds its *ring block*: the union of its
ulysses group's positions, sorted. Every other piece of the package (batch split,
RoPE positions, the all-to-all reorder, tests) derives from :func:`local_positions`.
"""

from __future__ import annotations

import torch

RING_IMPLS = ("basic", "zigzag", "stripe")


def check_ring_impl(ring_impl: str) -> None:
    if ring_impl not in RING_IMPLS:
        raise ValueError(f"ring_impl must be one of {RING_IMPLS}, got {ring_impl!r}")


def check_degrees(ulysses_degree: int, ring_degree: int) -> None:
    for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def sequence_multiple(ulysses_degree: int, ring_degree: int, ring_impl: str) -> int:
    """The number the global sequence length must be a multiple of."""
    check_ring_impl(ring_impl)
    check_degrees(ulysses_degree, ring_degree)
    cp_size = ulysses_degree * ring_degree
    return 2 * cp_size if ring_impl == "zigzag" else cp_size


def check_seq_len(seq_len: int, ulysses_degree: int, ring_degree: int, ring_impl: str) -> None:
    multiple = sequence_multiple(ulysses_degree, ring_degree, ring_impl)
    if seq_len <= 0 or seq_len % multiple != 0:
        need = "2 * U * R" if ring_impl == "zigzag" else "U * R"
        raise ValueError(
            f"sequence length {seq_len} must be a positive multiple of {need} = {multiple} "
            f"for ring_impl={ring_impl!r} with ulysses_degree={ulysses_degree}, "
            f"ring_degree={ring_degree}"
        )


def local_positions(
    seq_len: int,
    ulysses_degree: int,
    ring_degree: int,
    ulysses_rank: int,
    ring_rank: int,
    ring_impl: str = "zigzag",
) -> torch.Tensor:
    """Global positions (1-D int64, in local order) held by rank ``(ulysses_rank, ring_rank)``."""
    check_seq_len(seq_len, ulysses_degree, ring_degree, ring_impl)
    if not 0 <= ulysses_rank < ulysses_degree:
        raise ValueError(f"ulysses_rank {ulysses_rank} not in [0, {ulysses_degree})")
    if not 0 <= ring_rank < ring_degree:
        raise ValueError(f"ring_rank {ring_rank} not in [0, {ring_degree})")
    cp_size = ulysses_degree * ring_degree
    cp_rank = ring_rank * ulysses_degree + ulysses_rank
    if ring_impl == "zigzag":
        chunk = seq_len // (2 * cp_size)
        first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
        second_start = (2 * cp_size - 1 - cp_rank) * chunk
        return torch.cat([first, torch.arange(second_start, second_start + chunk)])
    if ring_impl == "stripe":
        owned = torch.arange(ring_rank, seq_len, ring_degree)
        piece = seq_len // cp_size
        return owned[ulysses_rank * piece : (ulysses_rank + 1) * piece]
    piece = seq_len // cp_size
    return torch.arange(cp_rank * piece, (cp_rank + 1) * piece)


def ring_block_positions(
    seq_len: int, ulysses_degree: int, ring_degree: int, ring_rank: int, ring_impl: str
) -> torch.Tensor:
    """Positions a ring rank holds after the ulysses all-to-all, in (sorted) position order."""
    held = [
        local_positions(seq_len, ulysses_degree, ring_degree, u, ring_rank, ring_impl)
        for u in range(ulysses_degree)
    ]
    return torch.cat(held).sort().values


def pieces_per_rank(ring_impl: str) -> int:
    """How many contiguous-in-the-ring-block pieces one rank's local shard consists of."""
    check_ring_impl(ring_impl)
    return 2 if ring_impl == "zigzag" else 1


def gather_piece_order(ulysses_degree: int, ring_impl: str) -> list[int]:
    """Order of the gathered pieces that puts a ring block in position order.

    The ulysses all-to-all concatenates the ranks' shards in ulysses-rank order, each
    shard made of ``pieces_per_rank`` equal pieces: piece ``u * k + i`` is piece ``i`` of
    rank ``u``. Entry ``j`` of the result is the gathered piece that goes to slot ``j``.
    Derived from :func:`local_positions` (the layout is the same for every ring rank).
    """
    k = pieces_per_rank(ring_impl)
    # Smallest sequence that has the layout: the order does not depend on the length.
    seq_len = sequence_multiple(ulysses_degree, 1, ring_impl)
    starts = []
    for u in range(ulysses_degree):
        pos = local_positions(seq_len, ulysses_degree, 1, u, 0, ring_impl)
        starts.extend(int(p[0]) for p in pos.chunk(k))
    return sorted(range(len(starts)), key=starts.__getitem__)
