"""USP core attention with the contract of Megatron's ``DotProductAttention``.

It takes the slot ``core_attention`` of a ``SelfAttention`` spec: Megatron hands it this
rank's sequence shard of q ``[sq, b, np, hn]`` and k/v ``[sk, b, ng, hn]`` (heads already
split by tensor parallelism, RoPE already applied) and gets back ``[sq, b, np * hn]``.
Inside, ``LongContextAttention`` runs the ulysses all-to-all and the ring over the
hierarchical context-parallel groups Megatron built.

For a layout that is not Megatron's own split (stripe, basic), Megatron's RoPE slice is
wrong for the tokens a rank holds; the first forward refuses to run until the model's
rotary embedding was given the layout's slice (``use_usp_rotary_embedding``), which tells
every ``USPAttention`` of the model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import get_pg_size, log_single_rank

from usp_megatron.attention import LongContextAttention
from usp_megatron.checks import renamed_keyword
from usp_megatron.heads import head_split
from usp_megatron.layout import LayoutArg
from usp_megatron.megatron.packed_batch import attach_packed_batch
from usp_megatron.megatron.packed_rope import use_vectorised_packed_rope
from usp_megatron.megatron.process_groups import usp_groups_from_megatron
from usp_megatron.megatron.validation import (
    check_attention_options,
    check_cp_comm_type,
    check_heads,
)

_CAUSAL = {AttnMaskType.causal: True, AttnMaskType.no_mask: False}

logger = logging.getLogger(__name__)


def describe_head_split(
    num_attention_heads: int,
    num_query_groups: int | None,
    tensor_parallel_size: int,
    ulysses_degree: int,
) -> str:
    """How the ulysses all-to-all splits a tensor-parallel rank's heads, and what an uneven
    split costs: every rank waits for the one with the most heads (max / mean)."""
    q_heads = num_attention_heads // tensor_parallel_size
    groups = num_attention_heads if num_query_groups is None else num_query_groups
    kv_heads = max(groups // tensor_parallel_size, 1)
    split = head_split(q_heads, kv_heads, ulysses_degree)
    return (
        f"USP: {q_heads} query / {kv_heads} key-value heads per tensor-parallel rank over "
        f"ulysses degree {ulysses_degree}: query heads per ulysses rank {split.q_heads}, "
        f"key/value heads {split.kv_heads}; imbalance (max / mean heads) "
        f"{split.imbalance:.2f}"
    )


def _thd_documents(packed_seq_params: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(cu_seqlens, cu_seqlens_padded)`` of THD ``packed_seq_params``; None for none."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.qkv_format != "thd" or packed_seq_params.cu_seqlens_q is None:
        raise ValueError(
            f"USP attention takes packed sequences in qkv_format 'thd' with cu_seqlens_q, got "
            f"qkv_format={packed_seq_params.qkv_format!r}; pass packed_seq_params=None otherwise"
        )
    params = packed_seq_params
    for q_name, kv_name in (
        ("cu_seqlens_q", "cu_seqlens_kv"),
        ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"),
    ):
        q_side, kv_side = getattr(params, q_name), getattr(params, kv_name)
        if kv_side is None or q_side is kv_side:
            continue
        if q_side is None or not torch.equal(q_side, kv_side):
            raise ValueError(
                f"USP attention is self-attention: {q_name} and {kv_name} must be equal, got "
                f"{q_side} and {kv_side}"
            )
    return params.cu_seqlens_q, params.cu_seqlens_q_padded


class USPAttention(MegatronModule):
    """Drop-in for ``DotProductAttention`` / ``TEDotProductAttention`` under USP."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        layout: LayoutArg = "zigzag",
        backend: str = "auto",
        rope_sliced_for_layout: bool = False,
        ring_impl: str | None = None,
    ) -> None:
        """``layout``: the sequence layout, a name or the object for these groups' degrees
        (``ring_impl=``: its old name). ``rope_sliced_for_layout``: the caller guarantees
        that the model's positions (RoPE, position ids) are those of the layout (the
        Megatron-LM hooks do); otherwise ``use_usp_rotary_embedding`` confirms it after the
        model is built."""
        super().__init__(config=config)
        layout = renamed_keyword("USPAttention", "ring_impl", "layout", ring_impl, layout, "zigzag")
        if attention_type != "self":
            raise ValueError(
                f"USP attention is self-attention only, got attention_type={attention_type!r}"
            )
        self.attn_mask_type = self._check_mask_type(attn_mask_type)
        check_attention_options(
            attention_dropout=(
                config.attention_dropout if attention_dropout is None else attention_dropout
            ),
            multi_latent_attention=config.multi_latent_attention,
            softmax_type=config.softmax_type,
            window_size=config.window_size,
        )
        self.groups = usp_groups_from_megatron(pg_collection)
        check_cp_comm_type(cp_comm_type, self.groups.ulysses_degree, self.groups.ring_degree)
        tp_group = getattr(pg_collection, "tp", None)
        tp_size = (
            get_pg_size(tp_group) if tp_group is not None else config.tensor_model_parallel_size
        )
        check_heads(
            config.num_attention_heads, tp_size, self.groups.ulysses_degree, config.num_query_groups
        )
        if layer_number == 1:
            message = describe_head_split(
                config.num_attention_heads,
                config.num_query_groups,
                tp_size,
                self.groups.ulysses_degree,
            )
            log_single_rank(logger, logging.INFO, message)
        # apply_query_key_layer_scaling divides the scores by the layer number and the
        # softmax multiplies it back: the same attention, so only the plain scale is used.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.attention = LongContextAttention(self.groups, layout=layout, backend=backend)
        use_vectorised_packed_rope()  # for packed batches, whoever made their boundaries
        # Local and global layers alternate by Megatron's own rule (window_attn_skip_freq).
        windowed = is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, max(1, layer_number)
        )
        self.window_size = tuple(config.window_size) if windowed else None
        layout_is_megatrons = self.attention.layout.megatron_split
        self.positions_confirmed = (
            rope_sliced_for_layout or layout_is_megatrons or self.groups.cp_size == 1
        )

    def _forward_thd(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        causal: bool,
        cu_seqlens: torch.Tensor,
        cu_seqlens_padded: torch.Tensor | None,
    ) -> torch.Tensor:
        """Packed documents: ``[t, heads, hn]`` (or ``[t, 1, heads, hn]``) in and out. The
        layout comes with the boundaries (``PackedBatch``, attached where the batch was
        split, or here at the first layer): no layer reads them on the host again."""
        with_batch = query.dim() == 4
        if with_batch and query.shape[1] != 1:
            raise ValueError(f"THD query must be [t, 1, heads, hn], got {tuple(query.shape)}")
        padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
        packed = attach_packed_batch(padded, cu_seqlens, self.attention.layout, self.groups)
        # [t, heads, hn] or [t, 1, heads, hn] -> [1, t, heads, hn]
        q, k, v = (t.reshape(1, t.shape[0], *t.shape[-2:]) for t in (query, key, value))
        out = self.attention(
            q, k, v, causal=causal, softmax_scale=self.softmax_scale,
            window_size=self.window_size, layout=packed.layout,
        )  # fmt: skip
        # [1, t, np, hn] -> [t, np * hn] (or [t, 1, np * hn])
        return out.reshape(query.shape[0], 1, -1) if with_batch else out.reshape(q.shape[1], -1)

    @staticmethod
    def _check_mask_type(attn_mask_type: AttnMaskType) -> AttnMaskType:
        if attn_mask_type not in _CAUSAL:
            raise ValueError(
                f"USP attention supports attn_mask_type causal or no_mask, got {attn_mask_type}: "
                "padding and arbitrary masks would have to travel the ring with the keys"
            )
        return attn_mask_type

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """query: [sq, b, np, hn]; key, value: [sk, b, ng, hn] -> [sq, b, np * hn].

        ``attention_mask`` is ignored, as ``TEDotProductAttention`` ignores it for the
        causal mask type: the mask is implied by the sequence layout.

        Packed documents (``packed_seq_params.qkv_format == "thd"``): query ``[t, np, hn]``
        (or ``[t, 1, np, hn]``), this rank's THD shard -> ``[t, np * hn]`` (``[t, 1, ...]``);
        the documents come from ``cu_seqlens_q`` / ``cu_seqlens_q_padded``.
        """
        documents = _thd_documents(packed_seq_params)
        if attention_bias is not None:
            raise ValueError("USP attention does not take an attention_bias")
        if not self.positions_confirmed:
            name = self.attention.layout.name
            raise ValueError(
                f"the {name} layout holds other tokens than Megatron's context-parallel split, "
                f"so Megatron's RoPE slice would be wrong: call usp_megatron.megatron."
                f"use_usp_rotary_embedding(model, {name!r}) once after building the model "
                "(or use the zigzag layout, which needs no call)"
            )
        mask_type = self._check_mask_type(
            self.attn_mask_type if attn_mask_type is None else attn_mask_type
        )
        if documents is not None:
            return self._forward_thd(query, key, value, _CAUSAL[mask_type], *documents)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, heads, hn]
        out = self.attention(
            q,
            k,
            v,
            causal=_CAUSAL[mask_type],
            softmax_scale=self.softmax_scale,
            window_size=self.window_size,
        )
        sq, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(sq, b, -1)  # [b, s, np, hn] -> [s, b, np * hn]
