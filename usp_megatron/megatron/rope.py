"""Rotary embedding rows for the positions this rank holds.

Megatron's ``RotaryEmbedding`` cuts its table for context parallelism as its own
(zigzag) split. :class:`USPRotaryEmbedding` takes the rows at the layout's positions
instead, so stripe and basic get the angles of the tokens they really hold (for a layout
that is Megatron's split both agree).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from usp_megatron.groups import USPGroups
from usp_megatron.layout import get_layout, layout_type
from usp_megatron.megatron.core_attention import USPAttention
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
