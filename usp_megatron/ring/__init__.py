"""Ring attention over a ring group: basic, zigzag and stripe, forward and backward."""

from usp_megatron.ring.attention import RingContext, ring_attention, ring_backward, ring_forward
from usp_megatron.ring.schedule import BlockTask, block_task

__all__ = [
    "BlockTask",
    "RingContext",
    "block_task",
    "ring_attention",
    "ring_backward",
    "ring_forward",
]
