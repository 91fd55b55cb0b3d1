"""What one attention block computes: which query rows see which key rows.

The layout decides it for every ring step (``layout.SequenceLayout.block_tasks``); the
kernels only read it. Rows are numbered inside the block, from 0, and a mask is a band
of diagonals: key row ``j`` is visible to query row ``i`` when ``lo <= j - i <= hi``
(``None``: unbounded on that side). Full attention is ``(None, None)``; causal is
``(None, 0)`` on a square block; a sliding window gives both bounds. The layout trims
every block so that each of its query rows sees at least one key row and each key row
is seen: no row of a kernel call is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALL_ROWS = slice(None)


@dataclass(frozen=True)
class BlockMask:
    """Key row ``j`` is visible to query row ``i`` iff ``lo <= j - i <= hi``."""

    lo: int | None = None
    hi: int | None = None

    @property
    def is_full(self) -> bool:
        return self.lo is None and self.hi is None

    @property
    def is_causal(self) -> bool:
        """The causal mask of a square block (the diagonal and below)."""
        return self.lo is None and self.hi == 0

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
