"""Rotary embedding rows for the positions this rank holds.

Megatron's ``RotaryEmbedding`` cuts its table for context parallelism as its own
(zigzag) split. :class:`USPRotaryEmbedding` takes the rows at the layout's positions
instead, so stripe and basic get the angles of the tokens they really hold (for a layout
that is Megatron's split both agree). Packed documents: ``packed_rope``.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from usp_megatron.checks import renamed_keyword
from usp_megatron.groups import USPGroups
from usp_megatron.layout import LayoutArg, resolve_layout
from usp_megatron.megatron.core_attention import USPAttention
from usp_megatron.megatron.process_groups import usp_groups_from_megatron


class USPRotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` whose forward returns the rows of this rank's USP positions."""

    def __init__(
        self,
        *args: object,
        layout: LayoutArg = "zigzag",
        groups: USPGroups | None = None,
        ring_impl: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        layout = renamed_keyword(
            "USPRotaryEmbedding", "ring_impl", "layout", ring_impl, layout, "zigzag"
        )
        self._set_layout(layout, groups)

    def _set_layout(self, layout: LayoutArg, groups: USPGroups | None) -> None:
        self.groups = groups if groups is not None else usp_groups_from_megatron()
        self.layout = resolve_layout(layout, self.groups.ulysses_degree, self.groups.ring_degree)

    @classmethod
    def adopt(
        cls, rotary: RotaryEmbedding, layout: LayoutArg, groups: USPGroups | None = None
    ) -> USPRotaryEmbedding:
        """The same embedding (frequencies, scaling, interleaving), sliced by USP positions."""
        if type(rotary) is not RotaryEmbedding and not isinstance(rotary, cls):
            raise ValueError(
                f"only Megatron's plain RotaryEmbedding can be re-sliced for USP, got "
                f"{type(rotary).__name__}: use the zigzag layout with it"
            )
        usp = cls.__new__(cls)
        usp.__dict__.update(rotary.__dict__)
        usp._set_layout(layout, groups)
        return usp

    def forward(  # type: ignore[override]
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: object = None,
    ) -> torch.Tensor:
        """``max_seq_len`` is the global length ``S``; returns ``[s, 1, 1, dim]``."""
        if packed_seq:
            raise ValueError(
                f"packed (THD) sequences need the zigzag layout (whose RoPE is Megatron's own "
                f"THD rotary), not {self.layout.name!r}"
            )
        emb = self.get_emb(max_seq_len, offset)  # [S, 1, 1, dim]
        if self.groups.cp_size == 1:
            return emb
        positions = self.layout.positions(
            max_seq_len, self.groups.ulysses_rank, self.groups.ring_rank
        )
        return emb.index_select(0, positions.to(emb.device))


def use_usp_rotary_embedding(model: torch.nn.Module, layout: LayoutArg) -> torch.nn.Module:
    """Give a built ``GPTModel`` the positions of ``layout`` (a name or the layout object
    its USP attention was built with); returns the model.

    Needed for layouts other than Megatron's own split (stripe, basic): the RoPE table is
    re-sliced (models without RoPE take their position ids from the batch split), and the
    model's USP attention modules are told, which lets their forward run.
    """
    attention = [module for module in model.modules() if isinstance(module, USPAttention)]
    groups = attention[0].groups if attention else usp_groups_from_megatron()
    resolved = resolve_layout(layout, groups.ulysses_degree, groups.ring_degree)
    for module in attention:
        if module.attention.layout != resolved:
            raise ValueError(
                f"the model's USP attention uses {module.attention.layout!r}, not "
                f"{resolved!r}: pass the layout its spec was built with"
            )
        module.positions_confirmed = True
    rotary = getattr(model, "rotary_pos_emb", None)
    if not resolved.megatron_split and isinstance(rotary, RotaryEmbedding):
        model.rotary_pos_emb = USPRotaryEmbedding.adopt(rotary, resolved, groups)
    return model
