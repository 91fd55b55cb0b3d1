"""Ring attention over a ring group, for every layout, forward and backward."""

from usp_megatron.ring.attention import RingInputs, ring_attention, ring_backward, ring_forward
from usp_megatron.ring.plan import RingPlan

__all__ = ["RingInputs", "RingPlan", "ring_attention", "ring_backward", "ring_forward"]
