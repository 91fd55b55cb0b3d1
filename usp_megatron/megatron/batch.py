"""This rank's share of a batch: every sequence tensor cut to the layout's positions.

Tokens, labels, loss mask and position ids are ``[b, s]`` and split along dim 1; an
attention mask ``[b, 1, s, s]`` keeps all keys and splits its query dim (2), as Megatron's
own ``get_batch_on_this_cp_rank`` does. For zigzag the result is exactly Megatron's split.
Megatron-LM ``core_v0.19.0`` also hands over packed-sequence entries (``cu_seqlens``...):
None is kept, anything else refused (USP's core attention takes no packed THD sequences).
"""

from __future__ import annotations

from typing import Any

from usp_megatron.groups import USPGroups
from usp_megatron.megatron.process_groups import usp_groups_from_megatron
from usp_megatron.sharding import shard_sequence

PACKED_SEQUENCE_KEYS = (
    "cu_seqlens",
    "cu_seqlens_padded",
    "max_seqlen",
    "local_cp_size",
    "hybrid_cp_group",
)


def get_batch_on_this_usp_rank(
    batch: dict[str, Any], ring_impl: str = "zigzag", groups: USPGroups | None = None
) -> dict[str, Any]:
    """A new dict with each tensor of ``batch`` cut to this rank's positions (None kept).

    ``groups`` defaults to the ones Megatron's ``parallel_state`` holds.
    """
    packed = [key for key in PACKED_SEQUENCE_KEYS if batch.get(key) is not None]
    if packed:
        raise ValueError(
            f"USP takes unpacked [b, s] sequences, but the batch has packed-sequence entries "
            f"{packed}: drop --sft, --dataloader-inter-document-masking and "
            "--hybrid-context-parallel (or the --usp-* flags)"
        )
    g = groups if groups is not None else usp_groups_from_megatron()
    if g.cp_size == 1:
        return dict(batch)
    return {
        key: None
        if value is None
        else shard_sequence(value, 2 if key == "attention_mask" else 1, g, ring_impl)
        for key, value in batch.items()
    }
