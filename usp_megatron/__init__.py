"""usp_megatron: Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core.

Notation, for every shape in the package: ``b`` is the micro-batch size, ``S`` the global
sequence length, ``U`` and ``R`` the ulysses and ring degrees (``u``, ``r``: a rank's place
in them; ``C = U * R`` the context-parallel size), ``s = S / C`` the tokens of one rank's
shard (its local sequence), ``U*s = S / R`` the tokens of a ring block (a ring rank's
sequence after the all-to-all), ``h`` heads (``hq`` query, ``hkv`` key/value, ``h_u`` those
one ulysses rank computes after the all-to-all), ``d`` the head dimension. Tensors are
``[b, s, h, d]`` inside the package (sequence before heads); Megatron's ``[s, b, h, d]``
appears only at its edge (``megatron/core_attention.py``), and packed documents (THD) are
``[t, h, d]`` there (``t`` tokens of a packed shard) and ``[1, t, h, d]`` inside.
"""

from usp_megatron.attention import LongContextAttention
from usp_megatron.degrees import choose_degrees
from usp_megatron.groups import USPGroups, init_usp_groups, usp_groups_from
from usp_megatron.kernels import BACKENDS, get_kernel
from usp_megatron.layout import (
    LAYOUT_NAMES,
    DenseLayout,
    PackedZigzagLayout,
    SequenceLayout,
    get_layout,
    local_positions,
    resolve_layout,
)
from usp_megatron.sharding import gather_sequence, shard_sequence

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DenseLayout",
    "LAYOUT_NAMES",
    "LongContextAttention",
    "PackedZigzagLayout",
    "SequenceLayout",
    "USPGroups",
    "choose_degrees",
    "gather_sequence",
    "get_kernel",
    "get_layout",
    "init_usp_groups",
    "local_positions",
    "resolve_layout",
    "shard_sequence",
    "usp_groups_from",
]
