"""Rotary embedding rows for the positions this rank holds.

Megatron's ``RotaryEmbedding`` cuts its table for context parallelism as its own
(zigzag) split. :class:`USPRotaryEmbedding` takes the rows at the layout's positions
instead, so stripe and basic get the angles of the tokens they really hold (for a layout
that is Megatron's split both agree).

Packed documents (THD): Megatron's RoPE without TransformerEngine loops over the
documents in every layer (``cu_seqlens[i].item()`` and a slice per document, for queries
and keys: hundreds of host synchronisations per layer). :func:`apply_rotary_pos_emb_usp`
takes the rotary row of every local token from the batch's ``PackedBatch`` instead
(built once where the batch is split) and applies RoPE in one vectorised step; the
same function, row for row.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from usp_megatron.groups import USPGroups
from usp_megatron.layout import get_layout, layout_type
from usp_megatron.megatron.core_attention import USPAttention
from usp_megatron.megatron.packed_batch import packed_batch_of
from usp_megatron.megatron.process_groups import usp_groups_from_megatron


class USPRotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` whose forward returns the rows of this rank's USP positions."""

    def __init__(
        self,
        *args: object,
        ring_impl: str = "zigzag",
        groups: USPGroups | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._set_layout(ring_impl, groups)

    def _set_layout(self, ring_impl: str, groups: USPGroups | None) -> None:
        self.groups = groups if groups is not None else usp_groups_from_megatron()
        self.ring_impl = ring_impl
        self.layout = get_layout(ring_impl, self.groups.ulysses_degree, self.groups.ring_degree)

    @classmethod
    def adopt(
        cls, rotary: RotaryEmbedding, ring_impl: str, groups: USPGroups | None = None
    ) -> USPRotaryEmbedding:
        """The same embedding (frequencies, scaling, interleaving), sliced by USP positions."""
        if type(rotary) is not RotaryEmbedding and not isinstance(rotary, cls):
            raise ValueError(
                f"only Megatron's plain RotaryEmbedding can be re-sliced for USP, got "
                f"{type(rotary).__name__}: use ring_impl='zigzag' with it"
            )
        usp = cls.__new__(cls)
        usp.__dict__.update(rotary.__dict__)
        usp._set_layout(ring_impl, groups)
        return usp

    def forward(  # type: ignore[override]
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: object = None,
    ) -> torch.Tensor:
        """``max_seq_len`` is the global length; returns ``[s_local, 1, 1, dim]``."""
        if packed_seq:
            raise ValueError(
                f"packed (THD) sequences need ring_impl='zigzag' (whose RoPE is Megatron's own "
                f"THD rotary), not {self.ring_impl!r}"
            )
        emb = self.get_emb(max_seq_len, offset)
        if self.groups.cp_size == 1:
            return emb
        positions = self.layout.positions(
            max_seq_len, self.groups.ulysses_rank, self.groups.ring_rank
        )
        return emb.index_select(0, positions.to(emb.device))


def use_usp_rotary_embedding(model: torch.nn.Module, ring_impl: str) -> torch.nn.Module:
    """Give a built ``GPTModel`` the positions of ``ring_impl``'s layout; returns the model.

    Needed for layouts other than Megatron's own split (stripe, basic): the RoPE table is
    re-sliced (models without RoPE take their position ids from the batch split), and the
    model's USP attention modules are told, which lets their forward run.
    """
    rotary = getattr(model, "rotary_pos_emb", None)
    if not layout_type(ring_impl).megatron_split and isinstance(rotary, RotaryEmbedding):
        model.rotary_pos_emb = USPRotaryEmbedding.adopt(rotary, ring_impl)
    for module in model.modules():
        if isinstance(module, USPAttention):
            if module.attention.ring_impl != ring_impl:
                raise ValueError(
                    f"the model's USP attention uses ring_impl={module.attention.ring_impl!r}, "
                    f"not {ring_impl!r}: pass the ring_impl its spec was built with"
                )
            module.positions_confirmed = True
    return model


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

    ``t``: ``[t_local, heads, dim]`` (or ``[t_local, 1, heads, dim]``) of a packed batch
    whose ``cu_seqlens`` carry a ``PackedBatch``; ``freqs``: the rotary table
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
        freqs.index_select(0, rows),
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
