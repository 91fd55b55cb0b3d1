"""RoPE for packed documents in one vectorised step per layer.

Megatron's RoPE without TransformerEngine loops over the documents in every layer
(``cu_seqlens[i].item()`` and a slice per document, for queries and keys: hundreds of host
synchronisations per layer). :func:`apply_rotary_pos_emb_usp` takes the rotary row of every
local token from the batch's ``PackedBatch`` instead (built once, where the batch is split
or at the first layer) and applies RoPE in one step: the same function, row for row.
``USPAttention`` installs it when it is built, so every packed batch gets it, whoever
made its ``PackedSeqParams``.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings import rope_utils

from usp_megatron.megatron.packed_batch import packed_batch_of


def apply_rotary_pos_emb_usp(
    t: torch.Tensor,
    freqs: torch.Tensor,
    config: Any,
    cu_seqlens: torch.Tensor | None = None,
    mscale: float = 1.0,
    cp_group: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Megatron's ``apply_rotary_pos_emb``, vectorised for USP's packed batches.

    ``t``: ``[t, heads, dim]`` (or ``[t, 1, heads, dim]``) of a packed batch whose
    ``cu_seqlens`` carry a ``PackedBatch``; ``freqs``: the rotary table
    ``[max_seqlen, 1, 1, rot_dim]``. Anything else (dense batches, TransformerEngine's
    fused RoPE, boundaries without a ``PackedBatch``) goes to Megatron's own function.
    """
    packed = None if cu_seqlens is None or config.apply_rope_fusion else packed_batch_of(cu_seqlens)
    if packed is None:
        return _MEGATRON_APPLY_ROTARY(
            t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group, **kwargs
        )
    longest = packed.layout.longest_real
    if longest > freqs.shape[0]:
        raise ValueError(
            f"the rotary table has {freqs.shape[0]} rows but a document has {longest} tokens: "
            "max_seqlen of the packed batch must be at least its longest document"
        )
    rows = packed.rope_rows
    if packed.layout.longest_padded > freqs.shape[0]:
        rows = rows.clamp(max=freqs.shape[0] - 1)  # only padding rows reach past the table
    # [t, heads, dim] -> [t, 1, heads, dim]: one "sequence" of t tokens, a row per token
    tokens = t if t.dim() == 4 else t.unsqueeze(1)
    out = rope_utils._apply_rotary_pos_emb_bshd(
        tokens,
        freqs.index_select(0, rows),  # [t, 1, 1, rot_dim]
        rotary_interleaved=config.rotary_interleaved,
        mscale=mscale,
    )
    return out if t.dim() == 4 else out.squeeze(1)


_MEGATRON_APPLY_ROTARY = rope_utils.apply_rotary_pos_emb


def use_vectorised_packed_rope() -> None:
    """Route Megatron's attention RoPE through :func:`apply_rotary_pos_emb_usp` (it imported
    ``apply_rotary_pos_emb`` by name); idempotent, and a no-op for every batch that does
    not carry a ``PackedBatch``."""
    from megatron.core.transformer import attention

    attention.apply_rotary_pos_emb = apply_rotary_pos_emb_usp
