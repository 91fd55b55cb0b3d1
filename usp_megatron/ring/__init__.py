"""Ring attention over a ring group, for every layout, forward and backward."""

from usp_megatron.ring.attention import ring_attention, ring_backward, ring_forward

__all__ = ["ring_attention", "ring_backward", "ring_forward"]
