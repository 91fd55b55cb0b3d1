"""``LongContextAttention``: Ulysses all-to-all around ring attention.

Each of the ``U x R`` ranks holds ``s_local = S / (U R)`` tokens (``layout.local_positions``)
and all heads. The all-to-all over the ulysses group trades heads for sequence, so each
rank holds ``hq / U`` heads of its ring block (``S / R`` tokens); ring attention over the
ring group computes those heads over the whole sequence; the all-to-all back restores
the local shard with all heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from usp_megatron.comm import UlyssesAllToAll
from usp_megatron.groups import USPGroups
from usp_megatron.kernels import check_backend, get_kernel
from usp_megatron.layout import check_ring_impl, check_seq_len
from usp_megatron.ring import RingContext, ring_attention


def kv_heads_for_ulysses(num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> int:
    """Fewest key/value heads (a multiple of ``num_kv_heads``) the all-to-all can split.

    With GQA/MQA, ``num_kv_heads`` may be smaller than (or not divide by) ``U``: each
    key/value head is then repeated just enough, which keeps every query head paired
    with its own key/value head. ``lcm(hkv, U)`` always divides ``hq``.
    """
    return math.lcm(num_kv_heads, ulysses_degree) if num_kv_heads % ulysses_degree else num_kv_heads


class LongContextAttention(nn.Module):
    """USP attention over ``groups``; inputs and output are this rank's sequence shard."""

    def __init__(self, groups: USPGroups, ring_impl: str = "zigzag", backend: str = "auto"):
        super().__init__()
        check_ring_impl(ring_impl)
        check_backend(backend)
        self.groups, self.ring_impl, self.backend = groups, ring_impl, backend
        self.ring = RingContext(groups.ring_group, groups.ring_rank, groups.ring_degree, ring_impl)
        self.all_to_all = (
            UlyssesAllToAll(groups.ulysses_group, groups.ulysses_degree, ring_impl)
            if groups.ulysses_degree > 1
            else None
        )

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        u = self.groups.ulysses_degree
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"q, k, v must be [b, s_local, heads, head_dim]; got shapes {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}"
            )
        if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(
                f"k and v must match q in batch, sequence and head_dim and each other; got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        hq, hkv = q.shape[2], k.shape[2]
        if hq % u:
            raise ValueError(f"query heads {hq} must be divisible by ulysses_degree {u}")
        if hq % hkv:
            raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")
        if len({q.dtype, k.dtype, v.dtype}) > 1:
            raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if len({q.device, k.device, v.device}) > 1:
            raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
        check_seq_len(q.shape[1] * self.groups.cp_size, u, self.groups.ring_degree, self.ring_impl)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        """q: [b, s_local, hq, d]; k, v: [b, s_local, hkv, d] -> [b, s_local, hq, d]."""
        self._check(q, k, v)
        kernel = get_kernel(self.backend, q.device, q.dtype)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        if self.all_to_all is None:
            return ring_attention(self.ring, kernel, q, k, v, causal, scale)
        hkv = kv_heads_for_ulysses(q.shape[2], k.shape[2], self.groups.ulysses_degree)
        if hkv != k.shape[2]:
            repeat = hkv // k.shape[2]
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        q, k, v = self.all_to_all.seq_to_heads(q, k, v)
        out = ring_attention(self.ring, kernel, q, k, v, causal, scale)
        (out,) = self.all_to_all.heads_to_seq(out)
        return out
