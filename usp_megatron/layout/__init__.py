"""THE sequence layout: one object per layout, the only place layouts differ.

- ``base``: the protocol (:class:`SequenceLayout`) every layout answers, and where the
  all-to-all puts what it receives (:class:`UlyssesPlacement`).
- ``dense``: one sequence cut into equal pieces (basic, zigzag, stripe).
- ``packed``: packed documents (THD), derived from zigzag once per batch.
- ``registry``: layouts by name, and :func:`resolve_layout` for what callers pass.

Nothing outside this package compares layout names.
"""

from usp_megatron.layout.base import SequenceLayout, UlyssesPlacement
from usp_megatron.layout.dense import BasicLayout, DenseLayout, StripeLayout, ZigzagLayout
from usp_megatron.layout.packed import PackedZigzagLayout
from usp_megatron.layout.registry import (
    LAYOUT_NAMES,
    LAYOUTS,
    LayoutArg,
    check_layout_name,
    get_layout,
    local_positions,
    resolve_layout,
)

__all__ = [
    "LAYOUTS",
    "LAYOUT_NAMES",
    "BasicLayout",
    "DenseLayout",
    "LayoutArg",
    "PackedZigzagLayout",
    "SequenceLayout",
    "StripeLayout",
    "UlyssesPlacement",
    "ZigzagLayout",
    "check_layout_name",
    "get_layout",
    "local_positions",
    "resolve_layout",
]
