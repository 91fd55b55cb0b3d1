"""Communication: the ulysses all-to-all and the ring's neighbour exchange."""

from usp_megatron.comm.all_to_all import (
    HeadRun,
    PendingExchange,
    heads_to_seq_start,
    seq_to_heads_start,
    split_heads,
)
from usp_megatron.comm.packed_all_to_all import (
    packed_heads_to_seq_start,
    packed_seq_to_heads_start,
)
from usp_megatron.comm.ring_exchange import RingExchange

__all__ = [
    "HeadRun",
    "PendingExchange",
    "RingExchange",
    "heads_to_seq_start",
    "packed_heads_to_seq_start",
    "packed_seq_to_heads_start",
    "seq_to_heads_start",
    "split_heads",
]
