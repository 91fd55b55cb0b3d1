"""Layouts by name, and the one function that turns what a caller passes into a layout.

A layout is named once (``zigzag``, ``stripe``, ``basic``: the ``--usp-ring-impl`` flag, a
spec's or a module's ``layout=``) and resolved here into the object for the degrees it
runs on; from there on the object travels.
"""

from __future__ import annotations

import functools

import torch

from usp_megatron.layout.base import SequenceLayout
from usp_megatron.layout.dense import BasicLayout, StripeLayout, ZigzagLayout

LAYOUTS: dict[str, type[SequenceLayout]] = {
    cls.name: cls for cls in (BasicLayout, ZigzagLayout, StripeLayout)
}
#: The names of the dense layouts, as flags and specs spell them.
LAYOUT_NAMES = tuple(LAYOUTS)

LayoutArg = SequenceLayout | str


def check_layout_name(name: object) -> None:
    """Refuse a name that is no layout's."""
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUT_NAMES}, got {name!r}")


@functools.lru_cache(maxsize=None, typed=True)
def get_layout(name: str, ulysses_degree: int, ring_degree: int) -> SequenceLayout:
    """The layout object named ``name`` over ``ulysses_degree x ring_degree`` ranks."""
    check_layout_name(name)
    return LAYOUTS[name](ulysses_degree, ring_degree)


def resolve_layout(
    layout: LayoutArg,
    ulysses_degree: int,
    ring_degree: int,
    cu_seqlens_padded: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> SequenceLayout:
    """The layout object of what a caller passes, checked against the degrees it runs on.

    ``layout``: a layout object (the attention module's, the batch split's: the object is
    the currency, pass it on) or a name; with document boundaries, the packed layout of
    those documents derived from it (``SequenceLayout.packed``).
    """
    if isinstance(layout, str):
        layout = get_layout(layout, ulysses_degree, ring_degree)
    elif not isinstance(layout, SequenceLayout):
        raise ValueError(f"layout must be a layout object or one of {LAYOUT_NAMES}, got {layout!r}")
    elif (layout.ulysses_degree, layout.ring_degree) != (ulysses_degree, ring_degree):
        raise ValueError(
            f"{layout!r} is for ulysses degree {layout.ulysses_degree} x ring degree "
            f"{layout.ring_degree}, but the groups are {ulysses_degree} x {ring_degree}"
        )
    if cu_seqlens_padded is None and cu_seqlens is None:
        return layout
    padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
    return layout.packed(padded, cu_seqlens)


def local_positions(
    seq_len: int,
    ulysses_degree: int,
    ring_degree: int,
    ulysses_rank: int,
    ring_rank: int,
    layout: LayoutArg,
    cu_seqlens_padded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global positions ``[s]`` (int64, in local order) held by rank ``(ulysses_rank,
    ring_rank)`` under ``layout`` (an object or a name); with ``cu_seqlens_padded`` those
    of packed documents."""
    resolved = resolve_layout(layout, ulysses_degree, ring_degree, cu_seqlens_padded)
    return resolved.positions(seq_len, ulysses_rank, ring_rank)
