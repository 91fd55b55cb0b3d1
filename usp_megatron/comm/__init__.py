"""Communication: the ulysses all-to-all and the ring's neighbour exchange."""

from usp_megatron.comm.all_to_all import PendingExchange, split_heads
from usp_megatron.comm.ring_exchange import RingExchange
from usp_megatron.comm.ulysses import heads_to_seq_start, seq_to_heads_start

__all__ = [
    "PendingExchange",
    "RingExchange",
    "heads_to_seq_start",
    "seq_to_heads_start",
    "split_heads",
]
