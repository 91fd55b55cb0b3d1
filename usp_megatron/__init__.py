"""usp_megatron: Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core."""

from usp_megatron.attention import LongContextAttention
from usp_megatron.degrees import choose_degrees
from usp_megatron.groups import USPGroups, init_usp_groups, usp_groups_from
from usp_megatron.kernels import BACKENDS, get_kernel
from usp_megatron.layout import (
    RING_IMPLS,
    DenseLayout,
    PackedZigzagLayout,
    SequenceLayout,
    get_layout,
    local_positions,
    packed_layout,
    resolve_layout,
)
from usp_megatron.sharding import gather_sequence, shard_sequence

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DenseLayout",
    "LongContextAttention",
    "PackedZigzagLayout",
    "RING_IMPLS",
    "SequenceLayout",
    "USPGroups",
    "choose_degrees",
    "gather_sequence",
    "get_kernel",
    "get_layout",
    "init_usp_groups",
    "local_positions",
    "packed_layout",
    "resolve_layout",
    "shard_sequence",
    "usp_groups_from",
]
