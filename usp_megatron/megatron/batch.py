"""This rank's share of a batch: every sequence tensor cut to the layout's positions.

Tokens, labels, loss mask and position ids are ``[b, s]`` and split along dim 1; an
attention mask ``[b, 1, s, s]`` keeps all keys and splits its query dim (2), as Megatron's
own ``get_batch_on_this_cp_rank`` does. For zigzag the result is exactly Megatron's split.

Packed documents (THD, a batch carrying ``cu_seqlens``, ``cu_seqlens_padded`` and
``max_seqlen``) split as Megatron's ``get_thd_batch_on_this_cp_rank`` does, with the same
indices (TransformerEngine's ``thd_get_partitioned_indices``) but without
TransformerEngine: the layout's ``PackedZigzagLayout`` positions.

Every rank of a context-parallel group must split the same documents: the THD split, which
reads the boundaries on the host once per batch anyway, compares them across the group
(one small all-gather) and refuses a mismatch, naming both.

Megatron-LM ``core_v0.19.0`` also hands over the entries of its hybrid context parallelism
(``local_cp_size``, ``hybrid_cp_group``): None is kept, anything else refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from usp_megatron.checks import renamed_keyword
from usp_megatron.groups import USPGroups
from usp_megatron.layout import LayoutArg, PackedZigzagLayout, resolve_layout
from usp_megatron.megatron.packed_batch import attach_packed_batch
from usp_megatron.megatron.process_groups import usp_groups_from_megatron
from usp_megatron.megatron.validation import USPRefusal
from usp_megatron.sharding import shard_sequence

#: Megatron-LM's own hybrid context parallelism, which does not compose with USP.
HYBRID_CP_KEYS = ("local_cp_size", "hybrid_cp_group")
#: Every packing entry a Megatron-LM batch may carry (None when unpacked).
PACKED_SEQUENCE_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", *HYBRID_CP_KEYS)
#: Batch entries that describe the packing rather than hold one value per token.
THD_KEYS = ("attention_mask", "cu_seqlens", "cu_seqlens_padded", "max_seqlen")


def _one_dim(name: str, value: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` as the data loader may batch it, ``[1, n]``, -> ``[n]``."""
    if value.dim() == 2 and value.shape[0] == 1:
        return value[0]
    if value.dim() != 1:
        raise ValueError(
            f"{name} must be [num_docs + 1] (or [1, num_docs + 1]: batch size 1), got shape "
            f"{tuple(value.shape)}"
        )
    return value


def check_same_documents(
    layout: PackedZigzagLayout, groups: USPGroups, device: torch.device
) -> None:
    """Refuse documents that differ between the ranks of one context-parallel group (each
    would attend its own idea of the sequence, silently): one all-gather of a fingerprint
    of the boundaries; only on a mismatch, which every rank of the group then sees, the
    boundaries themselves, to name both. Spoken by the group's first rank (of TP rank 0)."""
    mine = (layout.cu_seqlens_padded, layout.cu_seqlens)
    fingerprint = torch.tensor(
        [len(mine[0]), hash(mine[0]), hash(mine[1])], dtype=torch.int64, device=device
    )
    everyone = torch.empty(groups.cp_size * 3, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(everyone, fingerprint, group=groups.cp_group)
    if bool((everyone.view(-1, 3) == fingerprint).all()):
        return
    boundaries: list = [None] * groups.cp_size
    dist.all_gather_object(boundaries, mine, group=groups.cp_group)
    other = next(c for c, theirs in enumerate(boundaries) if theirs != boundaries[0])
    (padded_0, real_0), (padded_c, real_c) = boundaries[0], boundaries[other]
    first_tp = (
        not parallel_state.model_parallel_is_initialized()
        or parallel_state.get_tensor_model_parallel_rank() == 0
    )
    raise USPRefusal(
        f"context-parallel ranks 0 and {other} of one sequence hold different documents: "
        f"cu_seqlens {list(real_0)} (padded {list(padded_0)}) and {list(real_c)} (padded "
        f"{list(padded_c)}); every rank of a context-parallel group must get the same batch",
        speaks=groups.cp_rank == 0 and first_tp,
    )


def get_thd_batch_on_this_usp_rank(
    batch: dict[str, Any],
    cu_seqlens: torch.Tensor,
    cu_seqlens_padded: torch.Tensor | None,
    max_seqlen: torch.Tensor | int | None,
    layout: LayoutArg = "zigzag",
    groups: USPGroups | None = None,
    *,
    ring_impl: str | None = None,
) -> tuple[dict[str, Any], PackedSeqParams]:
    """Megatron's ``get_thd_batch_on_this_cp_rank`` for USP: ``(batch, packed_seq_params)``,
    each per-token tensor ``[1, t]`` cut to this rank's tokens (the packing entries and the
    attention mask kept), and the ``PackedSeqParams(qkv_format="thd")`` the model takes.

    ``layout``: the dense layout (a name or the object) the packed one derives from.
    ``cu_seqlens_padded=None``: no padding. ``max_seqlen``: the longest (padded) document,
    which sizes the RoPE table, as in Megatron (None: computed from ``cu_seqlens_padded``).
    """
    layout = renamed_keyword(
        "get_thd_batch_on_this_usp_rank", "ring_impl", "layout", ring_impl, layout, "zigzag"
    )
    g = groups if groups is not None else usp_groups_from_megatron()
    dense = resolve_layout(layout, g.ulysses_degree, g.ring_degree)
    cu_seqlens = _one_dim("cu_seqlens", cu_seqlens)
    padded = (
        cu_seqlens
        if cu_seqlens_padded is None
        else _one_dim("cu_seqlens_padded", cu_seqlens_padded)
    )
    # The batch's layout, once: every layer's attention and RoPE read it from `padded`.
    packed = attach_packed_batch(padded, cu_seqlens, dense, g)
    if g.cp_group is not None and g.cp_size > 1:
        check_same_documents(packed.layout, g, padded.device)
    if max_seqlen is None:
        max_seqlen = packed.layout.longest_padded
    elif isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen.reshape(-1)[0].item())
    packed_seq_params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
    split = dict(batch)
    if g.cp_size > 1:
        for key, value in batch.items():
            if key not in THD_KEYS and value is not None:
                split[key] = shard_sequence(value, 1, g, packed.layout)
    return split, packed_seq_params


def get_batch_on_this_usp_rank(
    batch: dict[str, Any],
    layout: LayoutArg = "zigzag",
    groups: USPGroups | None = None,
    *,
    ring_impl: str | None = None,
) -> dict[str, Any]:
    """A new dict with each tensor of ``batch`` cut to this rank's positions under
    ``layout`` (a name or the layout object; None entries kept).

    A batch with ``cu_seqlens`` (packed documents) is split by
    :func:`get_thd_batch_on_this_usp_rank` and gets the model's ``PackedSeqParams`` under
    ``"packed_seq_params"``. ``groups`` defaults to the ones Megatron's ``parallel_state``
    holds.
    """
    layout = renamed_keyword(
        "get_batch_on_this_usp_rank", "ring_impl", "layout", ring_impl, layout, "zigzag"
    )
    hybrid = [key for key in HYBRID_CP_KEYS if batch.get(key) is not None]
    if hybrid:
        raise ValueError(
            f"the batch has hybrid context-parallel entries {hybrid}: drop "
            "--hybrid-context-parallel (or the --usp-* flags)"
        )
    if batch.get("cu_seqlens") is None and batch.get("cu_seqlens_padded") is not None:
        raise ValueError(
            "the batch has cu_seqlens_padded but no cu_seqlens: packed documents need both "
            "(cu_seqlens: the real boundaries)"
        )
    g = groups if groups is not None else usp_groups_from_megatron()
    if batch.get("cu_seqlens") is not None:
        split, params = get_thd_batch_on_this_usp_rank(
            batch, batch["cu_seqlens"], batch.get("cu_seqlens_padded"),
            batch.get("max_seqlen"), layout, g,
        )  # fmt: skip
        split["packed_seq_params"] = params
        return split
    if g.cp_size == 1:
        return dict(batch)
    dense = resolve_layout(layout, g.ulysses_degree, g.ring_degree)
    return {
        key: None
        if value is None
        else shard_sequence(value, 2 if key == "attention_mask" else 1, g, dense)
        for key, value in batch.items()
    }
