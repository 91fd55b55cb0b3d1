"""``LongContextAttention``: Ulysses all-to-all around ring attention.

Each of the ``U x R`` ranks holds ``s_local = S / (U R)`` tokens (``layout.local_positions``)
and all heads. The all-to-all over the ulysses group trades heads for sequence, so each
rank holds ``hq / U`` heads of its ring block (``S / R`` tokens); ring attention over the
ring group computes those heads over the whole sequence; the all-to-all back restores
the local shard with all heads.

The all-to-alls receive straight into the ring block's layout (``comm``), so the kernels
read what arrived without a reordering copy. Optionally (``head_chunks`` > 1) the heads
go through in independent chunks, all all-to-alls started up front: chunk ``c + 1``
travels while chunk ``c`` computes. The backward mirrors this with the gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from usp_megatron.comm import GatherLayout, heads_to_seq_start, seq_to_heads_start, split_heads
from usp_megatron.groups import USPGroups
from usp_megatron.kernels import check_backend, get_kernel
from usp_megatron.layout import check_ring_impl, check_seq_len
from usp_megatron.ring import RingContext, ring_attention, ring_backward, ring_forward


def kv_heads_for_ulysses(num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> int:
    """Fewest key/value heads (a multiple of ``num_kv_heads``) the all-to-all can split.

    With GQA/MQA, ``num_kv_heads`` may be smaller than (or not divide by) ``U``: each
    key/value head is then repeated just enough, which keeps every query head paired
    with its own key/value head. ``lcm(hkv, U)`` always divides ``hq``.
    """
    return math.lcm(num_kv_heads, ulysses_degree) if num_kv_heads % ulysses_degree else num_kv_heads


class _UlyssesPlan:
    """Everything the pipelined all-to-all + ring needs besides the tensors."""

    def __init__(self, groups: USPGroups, ring: RingContext, layout: GatherLayout, chunks: int):
        self.group, self.degree = groups.ulysses_group, groups.ulysses_degree
        self.layout, self.ring, self.chunks = layout, ring, chunks


class _UlyssesRingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, kernel, causal, scale, q, k, v):
        u, n, layout, group = plan.degree, plan.chunks, plan.layout, plan.group
        sends = zip(split_heads(q, u, n), split_heads(k, u, n), split_heads(v, u, n))
        incoming = [seq_to_heads_start(list(t), layout, group) for t in sends]
        out = q.new_empty(q.shape)
        saved, outgoing = [], []
        for pending, dest in zip(incoming, split_heads(out, u, n)):
            q_r, k_r, v_r = pending.wait()
            out_r, lse = ring_forward(plan.ring, kernel, q_r, k_r, v_r, causal, scale)
            outgoing.append(heads_to_seq_start([out_r], [dest], layout, group))
            # The backward reads out in the sequence-major layout dout arrives in.
            saved += [q_r, k_r, v_r, outgoing[-1].sent, lse]
        for pending in outgoing:
            pending.wait()
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.kernel, ctx.causal, ctx.scale = plan, kernel, causal, scale
        ctx.shapes = (q.shape, k.shape, v.shape)
        return out

    @staticmethod
    def backward(ctx, dout):
        plan, (q_shape, k_shape, v_shape) = ctx.plan, ctx.shapes
        u, n, layout, group = plan.degree, plan.chunks, plan.layout, plan.group
        saved = ctx.saved_tensors
        incoming = [
            seq_to_heads_start([chunk], layout, group) for chunk in split_heads(dout, u, n)
        ]
        dq, dk, dv = (dout.new_empty(shape) for shape in (q_shape, k_shape, v_shape))
        destinations = zip(split_heads(dq, u, n), split_heads(dk, u, n), split_heads(dv, u, n))
        outgoing = []
        for c, (pending, dest) in enumerate(zip(incoming, destinations)):
            (dout_r,) = pending.wait()
            q_r, k_r, v_r, out_r, lse = saved[5 * c : 5 * c + 5]
            grads = ring_backward(
                plan.ring, ctx.kernel, dout_r, q_r, k_r, v_r, out_r, lse, ctx.causal, ctx.scale
            )
            outgoing.append(heads_to_seq_start(list(grads), list(dest), layout, group))
        for pending in outgoing:
            pending.wait()
        return None, None, None, None, dq, dk, dv


class LongContextAttention(nn.Module):
    """USP attention over ``groups``; inputs and output are this rank's sequence shard."""

    def __init__(
        self,
        groups: USPGroups,
        ring_impl: str = "zigzag",
        backend: str = "auto",
        head_chunks: int = 1,
    ):
        """``head_chunks``: how many pieces the heads go through the all-to-all in, so that
        one chunk's all-to-all overlaps another's compute. 1 (no overlap) is the default:
        on 4 H100s the overlapped NCCL kernels slowed the attention kernels by as much as
        the overlap saved (docs/benchmarks.md); slower links may want 2."""
        super().__init__()
        check_ring_impl(ring_impl)
        check_backend(backend)
        if not isinstance(head_chunks, int) or isinstance(head_chunks, bool) or head_chunks < 1:
            raise ValueError(f"head_chunks must be a positive integer, got {head_chunks!r}")
        self.groups, self.ring_impl, self.backend = groups, ring_impl, backend
        self.head_chunks = head_chunks
        self.ring = RingContext(groups.ring_group, groups.ring_rank, groups.ring_degree, ring_impl)
        self.gather_layout = GatherLayout(groups.ulysses_degree, ring_impl)

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
        u = self.groups.ulysses_degree
        if u == 1:
            return ring_attention(self.ring, kernel, q, k, v, causal, scale)
        hkv = kv_heads_for_ulysses(q.shape[2], k.shape[2], u)
        if hkv != k.shape[2]:
            repeat = hkv // k.shape[2]
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        chunks = self.head_chunks
        if (q.shape[2] // u) % chunks or (hkv // u) % chunks:
            raise ValueError(
                f"head_chunks={chunks} must divide the query heads per rank {q.shape[2] // u} "
                f"and the key/value heads per rank {hkv // u}"
            )
        plan = _UlyssesPlan(self.groups, self.ring, self.gather_layout, chunks)
        return _UlyssesRingFunction.apply(plan, kernel, causal, scale, q, k, v)
