"""A sliding-window block from a dense kernel and a windowed one: cuDNN does most of it.

PyTorch's cuDNN op has no window; its flash op has one but runs about 1.7x slower. A
banded block (``lo <= j - i <= hi``) is mostly rectangles that are wholly visible or
square-causal, so :class:`TiledWindowKernel` cuts it into query tiles of ``T`` rows; with
``B = hi - lo``, interior tile ``t`` (rows ``a .. a+T-1``) sees exactly

- keys ``a+lo .. a+lo+T-1``: key ``y`` of the square visible from row ``x`` iff ``y >= x``
  (the band's left edge: *anti-causal*; the windowed kernel's ``BlockMask(0, None)``, or
  the dense kernel's causal mask with rows and keys reversed);
- keys ``a+lo+T .. a+hi-1``, all of them (*full*: the dense kernel without a mask);
- keys ``a+hi .. a+hi+T-1``, ``y <= x`` (the right edge: *causal*, the dense kernel's).

Tile rule: ``T = B // divisor`` (with ``k`` contiguous and batch 1, every piece's rows and
keys are plain views for divisor 1 and 2; with 1 the two triangles meet and there is no
full piece). Each
kind of piece of all interior tiles is ONE kernel call, the tiles stacked as batch. Rows
before the first interior tile (the band cut by key 0) and after the last (cut by the
last key, or a tile that no longer fits) are sub-blocks of their own, cut the same way
(one-sided ones into full / causal / anti-causal pieces) or, when no tile fits, given to
the windowed kernel whole. So a block costs at most 9 calls whatever its length; the
pieces' outputs are merged by log-sum-exp in float32, and their gradients (every piece's
backward takes the final ``out`` and ``lse``, so they are exact contributions) add up.

A block whose band does not cut it (full, causal) is one plain dense call; one whose band
is narrower than ``divisor * min_tile`` is one windowed call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from usp_megatron.kernels.base import AttentionKernel, accum_dtype
from usp_megatron.mask import CAUSAL, FULL, BlockMask

FULL_PIECE, CAUSAL_PIECE, ANTICAUSAL_PIECE, BAND_PIECE = "full", "causal", "anticausal", "band"
ANTICAUSAL = BlockMask(lo=0)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the pieces' outputs and gradients add up: 16-bit ones in their own dtype (each
    add is computed in float32 and rounded once; an element gets at most three terms),
    since float32 buffers cost more passes over memory than the tiling saves; others in
    ``accum_dtype``."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else accum_dtype(dtype)


class Piece(NamedTuple):
    """``n`` tiles: tile ``t`` is query rows ``q0 + t*rows ..`` (``rows`` of them) against
    key rows ``k0 + t*rows ..`` (``keys`` of them), all under one mask ``kind`` (``band``:
    ``BlockMask(lo, hi)``, counted from each tile's first row and key)."""

    kind: str
    q0: int
    k0: int
    n: int
    rows: int
    keys: int
    lo: int | None = None
    hi: int | None = None

    def mask(self) -> BlockMask:
        return {FULL_PIECE: FULL, CAUSAL_PIECE: CAUSAL, ANTICAUSAL_PIECE: ANTICAUSAL}.get(
            self.kind, BlockMask(self.lo, self.hi)
        )


def _bounds(sq: int, sk: int, lo: int | None, hi: int | None) -> tuple[int | None, int | None]:
    """The band with bounds that cut nothing in an ``sq x sk`` block dropped (None)."""
    return (
        None if lo is None or lo <= 1 - sq else lo,
        None if hi is None or hi >= sk - 1 else hi,
    )


def _shifted(pieces: tuple[Piece, ...], q0: int, k0: int) -> tuple[Piece, ...]:
    return tuple(p._replace(q0=p.q0 + q0, k0=p.k0 + k0) for p in pieces)


def _rows_of_band(
    sq: int, sk: int, lo: int, hi: int, first: int, end: int, min_tile: int, divisor: int
) -> tuple[Piece, ...]:
    """Plan query rows ``first .. end-1`` of the band as a sub-block: only the keys they
    see, with the band counted from the sub-block's own corner."""
    k_first, k_end = max(0, first + lo), min(sk, end - 1 + hi + 1)
    shift = k_first - first
    sub = plan_band(end - first, k_end - k_first, lo - shift, hi - shift, min_tile, divisor)
    return _shifted(sub, first, k_first)


@functools.lru_cache(maxsize=1024)
def plan_band(
    sq: int, sk: int, lo: int | None, hi: int | None, min_tile: int, divisor: int = 2
) -> tuple[Piece, ...]:
    """The pieces of an ``sq x sk`` block under ``BlockMask(lo, hi)`` (trimmed: every row
    sees a key); together they cover every visible (row, key) pair exactly once."""
    BlockMask(lo, hi).flash_window(sq, sk)  # ValueError if the last row sees no key
    if hi is not None and hi < 0:
        raise ValueError(f"BlockMask(lo={lo}, hi={hi}): row 0 of a {sq}x{sk} block sees no key")
    if lo is not None and lo > 0:  # keys 0 .. lo-1 are seen by no row: leave them out
        hi = None if hi is None else hi - lo
        return _shifted(plan_band(sq, sk - lo, 0, hi, min_tile, divisor), 0, lo)
    lo, hi = _bounds(sq, sk, lo, hi)
    if lo is None and hi is None:
        return (Piece(FULL_PIECE, 0, 0, 1, sq, sk),)
    if lo is None:  # row i sees keys 0 .. i+hi: full 0..hi-1, then a causal square
        square = sk - hi
        pieces = [Piece(CAUSAL_PIECE, 0, hi, 1, square, square)]
        if hi > 0:
            pieces.append(Piece(FULL_PIECE, 0, 0, 1, square, hi))
        if square < sq:
            pieces.append(Piece(FULL_PIECE, square, 0, 1, sq - square, sk))
        return tuple(pieces)
    if hi is None:  # the mirror image: row i sees keys i+lo .. sk-1
        first, square = -lo, sq + lo
        pieces = [Piece(ANTICAUSAL_PIECE, first, 0, 1, square, square)]
        if first > 0:
            pieces.append(Piece(FULL_PIECE, 0, 0, 1, first, sk))
        if square < sk:
            pieces.append(Piece(FULL_PIECE, first, square, 1, square, sk - square))
        return tuple(pieces)
    tile = (hi - lo) // divisor
    first = max(0, -lo)  # the first row whose band key 0 does not cut
    n = (min(sq, sk - hi) - first) // tile if tile >= max(min_tile, 1) else 0
    if n <= 0:
        return (Piece(BAND_PIECE, 0, 0, 1, sq, sk, lo, hi),)
    end = first + n * tile
    pieces = [
        Piece(CAUSAL_PIECE, first, first + hi, n, tile, tile),
        Piece(ANTICAUSAL_PIECE, first, first + lo, n, tile, tile),
    ]
    if hi - lo > tile:  # divisor 1: the two triangles meet, nothing between them
        pieces.append(Piece(FULL_PIECE, first, first + lo + tile, n, tile, hi - lo - tile))
    if first > 0:
        pieces += _rows_of_band(sq, sk, lo, hi, 0, first, min_tile, divisor)
    if end < sq:
        pieces += _rows_of_band(sq, sk, lo, hi, end, sq, min_tile, divisor)
    return tuple(pieces)


def _tiles(x: Tensor, first: int, n: int, length: int, step: int) -> Tensor:
    """``x: [b, s, ...]`` -> ``[b*n, length, ...]``: tile ``t`` is rows ``first + t*step ..``
    (a view where the tiles neither overlap nor leave gaps and ``b == 1``)."""
    b, rest = x.shape[0], x.shape[2:]
    if n == 1 or length == step:
        return x[:, first : first + n * length].reshape(b * n, length, *rest)
    span = x[:, first : first + (n - 1) * step + length].unfold(1, length, step)
    return span.movedim(-1, 2).reshape(b * n, length, *rest)  # [b, n, length, ...]


def _lse_tiles(lse: Tensor, first: int, n: int, length: int) -> Tensor:
    """Final ``lse: [b, h, s]`` -> the tiles' ``[b*n, h, length]`` (contiguous)."""
    b, h = lse.shape[:2]
    rows = lse[:, :, first : first + n * length].reshape(b, h, n, length)
    return rows.transpose(1, 2).reshape(b * n, h, length)


def _add_tiles(acc: Tensor, tiles: Tensor, first: int, n: int, length: int, step: int) -> None:
    """``acc[:, rows of tile t] += tiles[t]``, the inverse of :func:`_tiles` (overlapping
    tiles add up)."""
    b, rest = acc.shape[0], acc.shape[2:]
    if n == 1 or length == step:
        acc[:, first : first + n * length].view(b, n, length, *rest).add_(
            tiles.reshape(b, n, length, *rest)
        )
        return
    rows = first + torch.arange(n, device=acc.device)[:, None] * step
    rows = (rows + torch.arange(length, device=acc.device)).flatten()
    acc.index_add_(1, rows, tiles.reshape(b, n * length, *rest).to(acc.dtype))


class TiledWindowKernel:
    """A banded block as full / causal pieces of ``dense`` plus what is left to
    ``windowed`` (module doc). ``flip_triangles``: the anti-causal pieces on ``dense`` too,
    causal with rows and keys reversed (a copy of their inputs and outputs), instead of on
    ``windowed``. ``divisor`` and ``min_tile`` are the tile rule's."""

    takes_windows = True
    takes_documents = False

    def __init__(
        self,
        dense: AttentionKernel,
        windowed: AttentionKernel,
        min_tile: int = 256,
        divisor: int = 2,
        flip_triangles: bool = False,
        name: str = "torch_window",
        min_piece: int = 64,
    ) -> None:
        """``min_piece``: pieces with fewer rows or keys go to ``windowed`` whatever their
        mask (cuDNN refuses 1 x 1 blocks, and such a piece costs less than a launch)."""
        if divisor < 1:
            raise ValueError(f"divisor must be >= 1 (tiles of at most the band), got {divisor}")
        self.dense, self.windowed = dense, windowed
        self.min_tile, self.divisor, self.flip_triangles = min_tile, divisor, flip_triangles
        self.name, self.min_piece = name, min_piece

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return self.dense.available(device, dtype) and self.windowed.available(device, dtype)

    def plan(self, sq: int, sk: int, mask: BlockMask) -> tuple[Piece, ...]:
        return plan_band(sq, sk, mask.lo, mask.hi, self.min_tile, self.divisor)

    def _kernel(self, piece: Piece) -> tuple[AttentionKernel, BlockMask, bool]:
        """Which kernel computes a piece, with which mask, and whether reversed."""
        if piece.kind == BAND_PIECE or min(piece.rows, piece.keys) < self.min_piece:
            return self.windowed, piece.mask(), False
        if piece.kind == ANTICAUSAL_PIECE:
            if self.flip_triangles:
                return self.dense, CAUSAL, True
            return self.windowed, ANTICAUSAL, False
        return self.dense, piece.mask(), False

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float):
        """q: [b, sq, hq, d], k/v: [b, sk, hkv, d] -> (out [b, sq, hq, d], lse [b, hq, sq])."""
        pieces = self.plan(q.shape[1], k.shape[1], mask)
        if len(pieces) == 1:  # the whole block, untiled
            return self._piece_forward(pieces[0], q, k, v, scale)
        b, sq, hq, d = q.shape
        results = [self._piece_forward(p, q, k, v, scale) for p in pieces]
        acc = accum_dtype(q.dtype)
        lse = q.new_full((b, hq, sq), float("-inf"), dtype=acc)
        piece_lse = []
        for p, (_, block_lse) in zip(pieces, results):
            rows = block_lse.reshape(b, p.n, hq, p.rows).transpose(1, 2).to(acc)  # [b, h, n, rows]
            into = lse[:, :, p.q0 : p.q0 + p.n * p.rows].view(b, hq, p.n, p.rows)
            into.copy_(torch.logaddexp(into, rows))
            piece_lse.append(rows)
        out = q.new_zeros((b, sq, hq, d), dtype=_sum_dtype(q.dtype))
        for p, (block_out, _), rows in zip(pieces, results, piece_lse):
            final = lse[:, :, p.q0 : p.q0 + p.n * p.rows].view(b, hq, p.n, p.rows)
            weight = torch.exp(rows - final).permute(0, 2, 3, 1).unsqueeze(-1)  # [b,n,r,h,1]
            into = out[:, p.q0 : p.q0 + p.n * p.rows].view(b, p.n, p.rows, hq, d)
            into.addcmul_(block_out.reshape(b, p.n, p.rows, hq, d), weight)
        return out.to(q.dtype), lse

    def _piece_forward(self, p: Piece, q: Tensor, k: Tensor, v: Tensor, scale: float):
        kernel, mask, flip = self._kernel(p)
        qt = _tiles(q, p.q0, p.n, p.rows, p.rows)
        kt, vt = (_tiles(x, p.k0, p.n, p.keys, p.rows) for x in (k, v))
        if not flip:
            return kernel.forward(qt, kt, vt, mask, scale)
        out, lse = kernel.forward(qt.flip(1), kt.flip(1), vt.flip(1), mask, scale)
        return out.flip(1), lse.flip(-1)

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        mask: BlockMask,
        scale: float,
    ):
        """Gradients given the final ``out`` and ``lse`` of the whole ring."""
        pieces = self.plan(q.shape[1], k.shape[1], mask)
        if len(pieces) == 1:
            return self._piece_backward(pieces[0], dout, q, k, v, out, lse, scale)
        acc = _sum_dtype(q.dtype)
        dq, dk, dv = (x.new_zeros(x.shape, dtype=acc) for x in (q, k, v))
        for p in pieces:
            dq_p, dk_p, dv_p = self._piece_backward(p, dout, q, k, v, out, lse, scale)
            _add_tiles(dq, dq_p, p.q0, p.n, p.rows, p.rows)
            _add_tiles(dk, dk_p, p.k0, p.n, p.keys, p.rows)
            _add_tiles(dv, dv_p, p.k0, p.n, p.keys, p.rows)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def _piece_backward(
        self, p: Piece, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
        lse: Tensor, scale: float,
    ):  # fmt: skip
        kernel, mask, flip = self._kernel(p)
        dout_t, q_t, out_t = (_tiles(x, p.q0, p.n, p.rows, p.rows) for x in (dout, q, out))
        k_t, v_t = (_tiles(x, p.k0, p.n, p.keys, p.rows) for x in (k, v))
        lse_t = lse if p.n == 1 and p.rows == q.shape[1] else _lse_tiles(lse, p.q0, p.n, p.rows)
        if not flip:
            return kernel.backward(dout_t, q_t, k_t, v_t, out_t, lse_t, mask, scale)
        grads = kernel.backward(
            *(x.flip(1) for x in (dout_t, q_t, k_t, v_t, out_t)), lse_t.flip(-1), mask, scale
        )
        return tuple(g.flip(1) for g in grads)
