"""``LongContextAttention``: Ulysses all-to-all around ring attention.

Each of the ``U x R`` ranks holds ``s_local = S / (U R)`` tokens (its layout's positions)
and all heads. The all-to-all over the ulysses group trades heads for sequence, so each
rank holds ``hq / U`` heads of its ring block (``S / R`` tokens); ring attention over the
ring group computes those heads over the whole sequence; the all-to-all back restores
the local shard with all heads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from usp_megatron.comm import (
    heads_to_seq_start,
    packed_heads_to_seq_start,
    packed_seq_to_heads_start,
    seq_to_heads_start,
    split_heads,
)
from usp_megatron.groups import USPGroups
from usp_megatron.kernels import AttentionKernel, check_backend, get_kernel
from usp_megatron.layout import (
    PackedZigzagLayout,
    SequenceLayout,
    check_window,
    get_layout,
    packed_layout,
)
from usp_megatron.ring import ring_attention, ring_backward, ring_forward
from usp_megatron.sharding import gather_sequence, shard_sequence


def kv_heads_for_ulysses(num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> int:
    """Fewest key/value heads (a multiple of ``num_kv_heads``) the all-to-all can split.

    With GQA/MQA, ``num_kv_heads`` may be smaller than (or not divide by) ``U``: each
    key/value head is then repeated just enough, which keeps every query head paired
    with its own key/value head. ``lcm(hkv, U)`` always divides ``hq``.
    """
    return math.lcm(num_kv_heads, ulysses_degree) if num_kv_heads % ulysses_degree else num_kv_heads


class _RingInputs(NamedTuple):
    """What one head chunk's ring pass saves for its backward (ring-block layout)."""

    q: torch.Tensor  # [b, S/R, hq/(U*chunks), d]
    k: torch.Tensor  # [b, S/R, hkv/(U*chunks), d]
    v: torch.Tensor
    out: torch.Tensor  # sequence-major, the layout dout arrives in
    lse: torch.Tensor  # [b, hq/(U*chunks), S/R]


class _UlyssesRingFunction(torch.autograd.Function):
    """All-to-all in, ring attention, all-to-all out; the backward mirrors it.

    Forward, for each of ``chunks`` slices of the heads (all all-to-alls are started up
    front, so chunk ``c + 1`` travels while chunk ``c`` computes):

    1. ``seq_to_heads``: this rank's ``[b, s_local, h, d]`` shard of q, k, v becomes
       ``[b, S/R, h/U, d]``: ``h/U`` heads of the whole ring block, in position order.
    2. ring attention over the ring group on those heads: ``out``, ``lse``.
    3. ``heads_to_seq``: ``out`` goes back to ``[b, s_local, h, d]``.

    Backward: ``dout`` takes step 1's path, the ring's backward gives dq, dk, dv of the
    ring block, and step 3's path takes them home.
    """

    @staticmethod
    def forward(ctx, groups, layout, kernel, causal, scale, window, chunks, q, k, v):
        degree, group = groups.ulysses_degree, groups.ulysses_group
        sends = zip(*(split_heads(t, degree, chunks) for t in (q, k, v)))
        incoming = [seq_to_heads_start(list(qkv), layout, group) for qkv in sends]
        out = q.new_empty(q.shape)  # contiguous: split_heads must give views of it
        saved: list[_RingInputs] = []
        outgoing = []
        for pending, destination in zip(incoming, split_heads(out, degree, chunks)):
            q_ring, k_ring, v_ring = pending.wait()
            out_ring, lse = ring_forward(
                groups, layout, kernel, q_ring, k_ring, v_ring, causal, scale, window
            )
            outgoing.append(heads_to_seq_start([out_ring], [destination], layout, group))
            saved.append(_RingInputs(q_ring, k_ring, v_ring, outgoing[-1].sent, lse))
        for pending in outgoing:
            pending.wait()
        ctx.save_for_backward(*(t for inputs in saved for t in inputs))
        ctx.groups, ctx.layout, ctx.kernel = groups, layout, kernel
        ctx.causal, ctx.scale, ctx.window, ctx.chunks = causal, scale, window, chunks
        ctx.kv_shape = k.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        groups, layout, chunks = ctx.groups, ctx.layout, ctx.chunks
        degree, group = groups.ulysses_degree, groups.ulysses_group
        per_chunk = len(_RingInputs._fields)
        flat = ctx.saved_tensors
        saved = [_RingInputs(*flat[i : i + per_chunk]) for i in range(0, len(flat), per_chunk)]
        incoming = [
            seq_to_heads_start([chunk], layout, group)
            for chunk in split_heads(dout, degree, chunks)
        ]
        dq = dout.new_empty(dout.shape)
        dk, dv = (dout.new_empty(ctx.kv_shape) for _ in range(2))
        destinations = zip(*(split_heads(t, degree, chunks) for t in (dq, dk, dv)))
        outgoing = []
        for pending, inputs, destination in zip(incoming, saved, destinations):
            (dout_ring,) = pending.wait()
            grads = ring_backward(
                groups, layout, ctx.kernel, dout_ring, inputs.q, inputs.k, inputs.v,
                inputs.out, inputs.lse, ctx.causal, ctx.scale, ctx.window,
            )
            outgoing.append(heads_to_seq_start(list(grads), list(destination), layout, group))
        for pending in outgoing:
            pending.wait()
        return None, None, None, None, None, None, None, dq, dk, dv


class _PackedUlyssesRingFunction(torch.autograd.Function):
    """:class:`_UlyssesRingFunction` for packed documents: the same three steps, with the
    all-to-all that reorders through a staging buffer (``comm.packed_all_to_all``) and one
    pass over all heads (no head chunks). The layout's block tasks carry the documents."""

    @staticmethod
    def forward(ctx, groups, layout, kernel, causal, scale, q, k, v):
        degree, group = groups.ulysses_degree, groups.ulysses_group
        sends = [split_heads(t, degree, 1)[0] for t in (q, k, v)]
        q_ring, k_ring, v_ring = packed_seq_to_heads_start(sends, layout, group).wait()
        out_ring, lse = ring_forward(groups, layout, kernel, q_ring, k_ring, v_ring, causal, scale)
        out = q.new_empty(q.shape)  # contiguous: split_heads must give views of it
        destination = split_heads(out, degree, 1)[0]
        packed_heads_to_seq_start([out_ring], [destination], layout, group).wait()
        ctx.save_for_backward(q_ring, k_ring, v_ring, out_ring, lse)
        ctx.groups, ctx.layout, ctx.kernel = groups, layout, kernel
        ctx.causal, ctx.scale = causal, scale
        ctx.kv_shape = k.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        groups, layout = ctx.groups, ctx.layout
        degree, group = groups.ulysses_degree, groups.ulysses_group
        q_ring, k_ring, v_ring, out_ring, lse = ctx.saved_tensors
        send = split_heads(dout.contiguous(), degree, 1)[0]
        (dout_ring,) = packed_seq_to_heads_start([send], layout, group).wait()
        grads = ring_backward(
            groups, layout, ctx.kernel, dout_ring, q_ring, k_ring, v_ring, out_ring, lse,
            ctx.causal, ctx.scale,
        )  # fmt: skip
        dq = dout.new_empty(dout.shape)
        dk, dv = (dout.new_empty(ctx.kv_shape) for _ in range(2))
        destinations = [split_heads(t, degree, 1)[0] for t in (dq, dk, dv)]
        packed_heads_to_seq_start(list(grads), destinations, layout, group).wait()
        return None, None, None, None, None, dq, dk, dv


class LongContextAttention(nn.Module):
    """USP attention over ``groups``; inputs and output are this rank's sequence shard.

    The module is the one thing to hold: :meth:`shard` and :meth:`gather` split and join
    full-sequence tensors with the same layout the attention assumes.
    """

    def __init__(
        self,
        groups: USPGroups,
        ring_impl: str = "zigzag",
        backend: str = "auto",
        head_chunks: int = 1,
    ) -> None:
        """``head_chunks``: how many pieces the heads go through the all-to-all in, so that
        one chunk's all-to-all overlaps another's compute. 1 (no overlap) is the default;
        slower links may want 2 (docs/benchmarks.md has the measurements)."""
        super().__init__()
        check_backend(backend)
        if not isinstance(head_chunks, int) or isinstance(head_chunks, bool) or head_chunks < 1:
            raise ValueError(f"head_chunks must be a positive integer, got {head_chunks!r}")
        self.layout: SequenceLayout = get_layout(
            ring_impl, groups.ulysses_degree, groups.ring_degree
        )
        self.groups, self.ring_impl, self.backend = groups, ring_impl, backend
        self.head_chunks = head_chunks
        self._kernels: dict[tuple[torch.device, torch.dtype, bool], AttentionKernel] = {}

    def shard(
        self, x: torch.Tensor, dim: int = 1, cu_seqlens_padded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This rank's positions of a full-sequence tensor ``x`` along ``dim``."""
        return shard_sequence(x, dim, self.groups, self.ring_impl, cu_seqlens_padded)

    def gather(
        self, x_local: torch.Tensor, dim: int = 1, cu_seqlens_padded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The full sequence from every rank's shard (not differentiable)."""
        return gather_sequence(x_local, dim, self.groups, self.ring_impl, cu_seqlens_padded)

    def positions(self, seq_len: int) -> torch.Tensor:
        """Global positions this rank holds, in local order."""
        return self.layout.positions(seq_len, self.groups.ulysses_rank, self.groups.ring_rank)

    def _kernel(self, device: torch.device, dtype: torch.dtype, windows: bool) -> AttentionKernel:
        key = (device, dtype, windows)
        if key not in self._kernels:
            self._kernels[key] = get_kernel(self.backend, device, dtype, windows)
        return self._kernels[key]

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
        self.layout.check_seq_len(q.shape[1] * self.groups.cp_size)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        softmax_scale: float | None = None,
        window_size: tuple[int, int] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cu_seqlens_padded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [b, s_local, hq, d]; k, v: [b, s_local, hkv, d] -> [b, s_local, hq, d].

        ``window_size=(left, right)``: the query at global position ``i`` sees keys
        ``i-left .. i+right`` (-1 unbounded; with ``causal`` also only keys ``<= i``);
        None or ``(-1, -1)`` is full attention.

        Packed documents (THD, batch 1): ``cu_seqlens`` (int ``[documents + 1]``, global, the
        same on every rank) are the real document boundaries, ``cu_seqlens_padded`` the
        padded ones (None: no padding), every padded length a multiple of ``2 * U * R``;
        the shard is Megatron's THD split (``local_positions(..., cu_seqlens_padded=)``).
        A token then attends only tokens of its own document (earlier-or-equal ones with
        ``causal``); padding rows give 0 and get no gradient.
        """
        if cu_seqlens is not None or cu_seqlens_padded is not None:
            return self._packed_forward(
                q, k, v, causal, softmax_scale, window_size, cu_seqlens, cu_seqlens_padded
            )
        self._check(q, k, v)
        window = check_window(window_size)
        kernel = self._kernel(q.device, q.dtype, window is not None)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        u = self.groups.ulysses_degree
        if u == 1:
            return ring_attention(
                self.groups, self.layout, kernel, q, k, v, causal, scale, window
            )
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
        return _UlyssesRingFunction.apply(
            self.groups, self.layout, kernel, causal, scale, window, chunks, q, k, v
        )

    def packed_layout(
        self, cu_seqlens_padded: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> PackedZigzagLayout:
        """The packed-documents layout of these boundaries over this module's groups."""
        u, r = self.groups.ulysses_degree, self.groups.ring_degree
        return packed_layout(self.ring_impl, u, r, cu_seqlens_padded, cu_seqlens)

    def _packed_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        softmax_scale: float | None,
        window_size: tuple[int, int] | None,
        cu_seqlens: torch.Tensor | None,
        cu_seqlens_padded: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`forward` for packed documents."""
        if cu_seqlens is None:
            raise ValueError(
                "cu_seqlens_padded was given without cu_seqlens: pass the real document "
                "boundaries as cu_seqlens (cu_seqlens_padded=None means no padding)"
            )
        if check_window(window_size) is not None:
            raise ValueError(
                f"window_size={window_size} together with packed documents (cu_seqlens) is "
                "not supported; use full-length attention within each document"
            )
        layout = self.packed_layout(
            cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded, cu_seqlens
        )
        if q.dim() != 4 or q.shape[0] != 1:
            raise ValueError(
                f"packed documents need q of shape [1, s_local, heads, head_dim] (batch 1: "
                f"the documents are packed along the sequence), got {tuple(q.shape)}"
            )
        layout.check_seq_len(q.shape[1] * self.groups.cp_size)
        self._check(q, k, v)
        u = self.groups.ulysses_degree
        if q.shape[2] % u:
            raise ValueError(f"query heads {q.shape[2]} must be divisible by ulysses_degree {u}")
        kernel = get_kernel(self.backend, q.device, q.dtype, documents=True)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        if u == 1:
            return ring_attention(self.groups, layout, kernel, q, k, v, causal, scale)
        hkv = kv_heads_for_ulysses(q.shape[2], k.shape[2], u)
        if hkv != k.shape[2]:
            repeat = hkv // k.shape[2]
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        return _PackedUlyssesRingFunction.apply(self.groups, layout, kernel, causal, scale, q, k, v)
