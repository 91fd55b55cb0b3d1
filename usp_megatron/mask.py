"""What one attention block computes: which query rows see which key rows.

The layout decides it for every ring step (``layout.SequenceLayout.block_tasks``); the
kernels only read it. Rows are numbered inside the block, from 0, and a mask is a band
of diagonals: key row ``j`` is visible to query row ``i`` when ``lo <= j - i <= hi``
(``None``: unbounded on that side). Full attention is ``(None, None)``; causal is
``(None, 0)`` on a square block; a sliding window gives both bounds. The layout trims
every block so that each of its query rows sees at least one key row and each key row
is seen: no row of a kernel call is empty.

Packed documents (THD) add ``Documents`` to a mask: query rows see only key rows of their
own document, and rows of padding or of a document that has no keys in the block see
nothing at all. Such rows cannot be trimmed away (one block holds many documents), so
a kernel gives them output 0 and log-sum-exp -inf, and no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALL_ROWS = slice(None)


@dataclass(frozen=True)
class Documents:
    """Document ``n`` of a block: query rows ``q_starts[n] .. + q_lens[n]`` see key rows
    ``k_starts[n] .. + k_lens[n]``, all of them, or with ``causal`` key ``k_starts[n] + j``
    only from query ``q_starts[n] + j`` on (causal segments are square). Rows outside
    every segment (padding, documents with no keys here) see nothing. Every segment has
    at least one row on each side."""

    q_starts: tuple[int, ...]
    q_lens: tuple[int, ...]
    k_starts: tuple[int, ...]
    k_lens: tuple[int, ...]
    causal: bool

    def __post_init__(self) -> None:
        if self.causal and self.q_lens != self.k_lens:
            raise ValueError(f"causal document segments must be square, got {self}")
        if min(self.q_lens, default=1) < 1 or min(self.k_lens, default=1) < 1:
            raise ValueError(f"document segments must not be empty, got {self}")

    @property
    def max_q(self) -> int:
        return max(self.q_lens)

    @property
    def max_k(self) -> int:
        return max(self.k_lens)

    def visible(self, sq: int, sk: int, device: torch.device | None = None) -> torch.Tensor:
        """``[sq, sk]`` boolean: which key rows each query row sees."""
        seen = torch.zeros(sq, sk, dtype=torch.bool, device=device)
        for q0, nq, k0, nk in zip(self.q_starts, self.q_lens, self.k_starts, self.k_lens):
            block = torch.ones(nq, nk, dtype=torch.bool, device=device)
            seen[q0 : q0 + nq, k0 : k0 + nk] = block.tril() if self.causal else block
        return seen


@dataclass(frozen=True)
class BlockMask:
    """Key row ``j`` is visible to query row ``i`` iff ``lo <= j - i <= hi`` (and, with
    ``documents``, only within one document's segments: the band is then unbounded)."""

    lo: int | None = None
    hi: int | None = None
    documents: Documents | None = None

    def __post_init__(self) -> None:
        if self.documents is not None and (self.lo, self.hi) != (None, None):
            raise ValueError(f"a band (lo={self.lo}, hi={self.hi}) with documents is not supported")

    @property
    def is_full(self) -> bool:
        return self.lo is None and self.hi is None and self.documents is None

    @property
    def is_causal(self) -> bool:
        """The causal mask of a square block (the diagonal and below)."""
        return self.lo is None and self.hi == 0 and self.documents is None

    def flash_window(self, sq: int, sk: int) -> tuple[int, int]:
        """``(window_size_left, window_size_right)`` of FlashAttention's convention, which
        centres the band on the bottom-right diagonal ``j - i = sk - sq``; -1 is unbounded.
        Both are >= 0 for a trimmed block (see the module doc)."""
        offset = sk - sq
        left = -1 if self.lo is None else offset - self.lo
        right = -1 if self.hi is None else self.hi - offset
        if (self.lo is not None and left < 0) or (self.hi is not None and right < 0):
            raise ValueError(f"{self} on a {sq}x{sk} block has rows that see no key")
        return left, right

    def visible(self, sq: int, sk: int, device: torch.device | None = None) -> torch.Tensor:
        """``[sq, sk]`` boolean: which key rows each query row sees."""
        if self.documents is not None:
            return self.documents.visible(sq, sk, device)
        diagonal = torch.arange(sk, device=device) - torch.arange(sq, device=device)[:, None]
        seen = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if self.lo is not None:
            seen &= diagonal >= self.lo
        if self.hi is not None:
            seen &= diagonal <= self.hi
        return seen


FULL = BlockMask()
CAUSAL = BlockMask(hi=0)


@dataclass(frozen=True)
class BlockTask:
    """Attend ``q[:, q_rows]`` to ``k/v[:, kv_rows]`` under ``mask``."""

    q_rows: slice
    kv_rows: slice
    mask: BlockMask
