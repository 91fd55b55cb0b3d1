"""What one attention block computes: which query rows see which key rows.

The layout decides it for every ring step (``layout.SequenceLayout.block_tasks``); the
kernels only read it. Rows are numbered inside the block, from 0.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_ROWS = slice(None)


@dataclass(frozen=True)
class BlockMask:
    """``causal``: a square block where query row ``i`` sees key rows ``j <= i``; otherwise
    every query row sees every key row."""

    causal: bool = False


FULL = BlockMask(causal=False)
CAUSAL = BlockMask(causal=True)


@dataclass(frozen=True)
class BlockTask:
    """Attend ``q[:, q_rows]`` to ``k/v[:, kv_rows]`` under ``mask``."""

    q_rows: slice
    kv_rows: slice
    mask: BlockMask
