"""One attention call's decisions, made once in its forward and shared by its backward.

``LongContextAttention`` resolves everything a call depends on before any communication
(the process groups, the layout, the kernel, the mask, the heads' split) into one frozen
:class:`AttentionCall`; the all-to-all, the ring and both autograd functions read it
instead of long argument lists, and the ring's set-up (its tasks and neighbour
exchanges, ``ring.RingPlan``) is derived from it once per shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from usp_megatron.checks import Window
from usp_megatron.groups import USPGroups
from usp_megatron.heads import HeadSplit
from usp_megatron.kernels import AttentionKernel
from usp_megatron.layout import SequenceLayout


@dataclass(frozen=True)
class AttentionCall:
    """What one USP attention call computes and over which ranks."""

    groups: USPGroups
    #: The layout of this call (the module's, or one batch's packed documents).
    layout: SequenceLayout
    kernel: AttentionKernel
    causal: bool
    scale: float
    #: ``(left, right)`` (``checks.check_window``), None for full-length attention.
    window: Window | None
    #: Which heads each ulysses rank computes.
    heads: HeadSplit
    #: How many pieces the heads go through the all-to-all in (overlap of communication
    #: with compute); 1 without ulysses.
    head_chunks: int = 1
