"""``LongContextAttention``: Ulysses all-to-all around ring attention.

Each of the ``U x R`` ranks holds ``s_local = S / (U R)`` tokens (its layout's positions)
and all heads. The all-to-all over the ulysses group trades heads for sequence, so each
rank holds ``hq / U`` heads of its ring block (``S / R`` tokens); ring attention over the
ring group computes those heads over the whole sequence; the all-to-all back restores
the local shard with all heads. When ``U`` does not divide ``hq``, ulysses ranks hold
different numbers of heads (:class:`HeadSplit`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import nn

from usp_megatron.comm import (
    HeadRun,
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


def _largest_block(first: int, count: int, group: int) -> int:
    """The largest divisor of ``count`` such that each block of that many query heads from
    head ``first`` on lies within one key/value group of ``group`` query heads."""

    def reads_one_kv_head(size: int) -> bool:
        starts = range(first, first + count, size)
        return all(start // group == (start + size - 1) // group for start in starts)

    return max(
        size for size in range(1, count + 1) if count % size == 0 and reads_one_kv_head(size)
    )


class HeadSplit:
    """Which heads each ulysses rank computes, with GQA/MQA and any ``U <= hq``.

    Ulysses rank ``u`` computes a contiguous range of query heads: ``hq // U`` of them, one
    more on the first ``hq % U`` ranks. Its range comes in blocks of ``ratio`` query heads
    that read one key/value head each, and the rank receives that key/value head once per
    block: the kernels then see plain GQA. A key/value head read by several ranks is sent
    to each (and repeated within a rank where a block boundary splits its group);
    autograd sums the gradients of the copies back.

    The blocks are as large as the range allows (the largest divisor of the rank's query
    heads whose blocks never straddle two key/value heads). When ``U`` divides ``hq`` one
    ratio, ``gcd(hq/U, hq/hkv)``, serves every rank instead: each rank then receives
    ``lcm(hkv, U) / U`` key/value heads and the all-to-all stays one equal split.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> None:
        if not 1 <= ulysses_degree <= num_q_heads:
            raise ValueError(
                f"ulysses_degree {ulysses_degree} must be between 1 and the query heads "
                f"{num_q_heads}: every ulysses rank computes at least one head"
            )
        if num_kv_heads < 1 or num_q_heads % num_kv_heads:
            raise ValueError(
                f"query heads {num_q_heads} must be a multiple of key/value heads {num_kv_heads}"
            )
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.ulysses_degree = ulysses_degree
        group = num_q_heads // num_kv_heads  # query heads per key/value head
        base, extra = divmod(num_q_heads, ulysses_degree)
        self.even = extra == 0
        #: Query heads of each ulysses rank; rank ``u`` starts at ``sum(q_heads[:u])``.
        self.q_heads = tuple(base + (rank < extra) for rank in range(ulysses_degree))
        kv_index, first = [], 0
        for count in self.q_heads:
            ratio = math.gcd(count, group) if self.even else _largest_block(first, count, group)
            kv_index.append(tuple(head // group for head in range(first, first + count, ratio)))
            first += count
        #: The key/value heads (indices into ``k``) each ulysses rank receives, in order.
        self.kv_index = tuple(kv_index)
        self.kv_heads = tuple(len(heads) for heads in kv_index)
        self.q_runs, self.kv_runs = self._runs()
        self._sent_kv = tuple(head for heads in kv_index for head in heads)
        self._index_on: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"HeadSplit(hq={self.num_q_heads}, hkv={self.num_kv_heads}, "
            f"U={self.ulysses_degree}: query heads {self.q_heads}, key/value heads "
            f"{self.kv_heads})"
        )

    @property
    def imbalance(self) -> float:
        """Max over mean query heads per rank: how much longer the slowest rank computes."""
        return max(self.q_heads) * self.ulysses_degree / self.num_q_heads

    def _runs(self) -> tuple[list[HeadRun], list[HeadRun]]:
        """Query and key/value :class:`HeadRun` s: consecutive ranks that receive equally
        many query heads and equally many key/value heads share one run (the all-to-all
        packs a run with one copy per tensor)."""
        q_runs: list[HeadRun] = []
        kv_runs: list[HeadRun] = []
        for q_count, kv_count in zip(self.q_heads, self.kv_heads):
            if q_runs and (q_runs[-1].heads, kv_runs[-1].heads) == (q_count, kv_count):
                q_runs[-1] = HeadRun(q_runs[-1].ranks + 1, q_count)
                kv_runs[-1] = HeadRun(kv_runs[-1].ranks + 1, kv_count)
            else:
                q_runs.append(HeadRun(1, q_count))
                kv_runs.append(HeadRun(1, kv_count))
        return q_runs, kv_runs

    def replicate_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, hkv, d] -> [b, s, sum(kv_heads), d]: the key/value heads to send, in rank
        order (differentiable; a repeat of every head alike where that is what it is)."""
        sent, hkv = self._sent_kv, self.num_kv_heads
        repeat = len(sent) // hkv
        if sent == tuple(head // repeat for head in range(len(sent))):
            return x if repeat == 1 else x.repeat_interleave(repeat, dim=2)
        if x.device not in self._index_on:
            self._index_on[x.device] = torch.tensor(sent, device=x.device)
        return x.index_select(2, self._index_on[x.device])


@functools.cache
def head_split(num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> HeadSplit:
    """The :class:`HeadSplit` of these head counts (one object per combination)."""
    return HeadSplit(num_q_heads, num_kv_heads, ulysses_degree)


class _RingInputs(NamedTuple):
    """What one head chunk's ring pass saves for its backward (ring-block layout)."""

    q: torch.Tensor  # [b, S/R, hq_u/chunks, d], hq_u: this ulysses rank's query heads
    k: torch.Tensor  # [b, S/R, hkv_u/chunks, d]
    v: torch.Tensor
    out: torch.Tensor  # sequence-major, the layout dout arrives in
    lse: torch.Tensor  # [b, hq_u/chunks, S/R]


class _UlyssesRingFunction(torch.autograd.Function):
    """All-to-all in, ring attention, all-to-all out; the backward mirrors it.

    Forward, for each of ``chunks`` slices of the heads (all all-to-alls are started up
    front, so chunk ``c + 1`` travels while chunk ``c`` computes):

    1. ``seq_to_heads``: this rank's ``[b, s_local, h, d]`` shard of q, k, v becomes
       ``[b, S/R, h_u, d]``: the ``h_u`` heads of ulysses rank ``u`` (``HeadSplit``; ``h/U``
       when ``U`` divides ``h``) over the whole ring block, in position order.
    2. ring attention over the ring group on those heads: ``out``, ``lse``.
    3. ``heads_to_seq``: ``out`` goes back to ``[b, s_local, h, d]``.

    Backward: ``dout`` takes step 1's path, the ring's backward gives dq, dk, dv of the
    ring block, and step 3's path takes them home.
    """

    @staticmethod
    def forward(ctx, groups, layout, kernel, causal, scale, window, chunks, split, q, k, v):
        group = groups.ulysses_group
        q_runs, kv_runs = split.q_runs, split.kv_runs
        with_runs = ((q, q_runs), (k, kv_runs), (v, kv_runs))
        sends = zip(*(split_heads(t, runs, chunks) for t, runs in with_runs))
        incoming = [seq_to_heads_start(list(qkv), layout, group) for qkv in sends]
        out = q.new_empty(q.shape)  # contiguous: split_heads must give views of it
        saved: list[_RingInputs] = []
        outgoing = []
        for pending, destination in zip(incoming, split_heads(out, q_runs, chunks)):
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
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        ctx.chunks, ctx.split = chunks, split
        ctx.kv_shape = k.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        groups, layout, chunks = ctx.groups, ctx.layout, ctx.chunks
        group = groups.ulysses_group
        q_runs, kv_runs = ctx.split.q_runs, ctx.split.kv_runs
        per_chunk = len(_RingInputs._fields)
        flat = ctx.saved_tensors
        saved = [_RingInputs(*flat[i : i + per_chunk]) for i in range(0, len(flat), per_chunk)]
        incoming = [
            seq_to_heads_start([chunk], layout, group)
            for chunk in split_heads(dout, q_runs, chunks)
        ]
        dq = dout.new_empty(dout.shape)
        dk, dv = (dout.new_empty(ctx.kv_shape) for _ in range(2))
        with_runs = ((dq, q_runs), (dk, kv_runs), (dv, kv_runs))
        destinations = zip(*(split_heads(t, runs, chunks) for t, runs in with_runs))
        outgoing = []
        for pending, inputs, destination in zip(incoming, saved, destinations):
            (dout_ring,) = pending.wait()
            grads = ring_backward(
                groups,
                layout,
                ctx.kernel,
                dout_ring,
                inputs.q,
                inputs.k,
                inputs.v,
                inputs.out,
                inputs.lse,
                ctx.causal,
                ctx.scale,
                ctx.window,
            )
            outgoing.append(heads_to_seq_start(list(grads), list(destination), layout, group))
        for pending in outgoing:
            pending.wait()
        return None, None, None, None, None, None, None, None, dq, dk, dv


def _even_heads(x: torch.Tensor, ulysses_degree: int) -> torch.Tensor:
    """[b, s, h, d] -> the view [b, s, U, h/U, d] an even all-to-all sends."""
    (view,) = split_heads(x, [HeadRun(ulysses_degree, x.shape[2] // ulysses_degree)])[0]
    return view


class _PackedUlyssesRingFunction(torch.autograd.Function):
    """:class:`_UlyssesRingFunction` for packed documents: the same three steps, with the
    all-to-all that reorders through a staging buffer (``comm.packed_all_to_all``) and one
    pass over all heads (no head chunks). The layout's block tasks carry the documents."""

    @staticmethod
    def forward(ctx, groups, layout, kernel, causal, scale, q, k, v):
        degree, group = groups.ulysses_degree, groups.ulysses_group
        sends = [_even_heads(t, degree) for t in (q, k, v)]
        q_ring, k_ring, v_ring = packed_seq_to_heads_start(sends, layout, group).wait()
        out_ring, lse = ring_forward(groups, layout, kernel, q_ring, k_ring, v_ring, causal, scale)
        out = q.new_empty(q.shape)  # contiguous: the view below must be of it
        destination = _even_heads(out, degree)
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
        send = _even_heads(dout.contiguous(), degree)
        (dout_ring,) = packed_seq_to_heads_start([send], layout, group).wait()
        grads = ring_backward(
            groups, layout, ctx.kernel, dout_ring, q_ring, k_ring, v_ring, out_ring, lse,
            ctx.causal, ctx.scale,
        )  # fmt: skip
        dq = dout.new_empty(dout.shape)
        dk, dv = (dout.new_empty(ctx.kv_shape) for _ in range(2))
        destinations = [_even_heads(t, degree) for t in (dq, dk, dv)]
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
        self._kernels: dict[tuple[torch.device, torch.dtype, bool, bool], AttentionKernel] = {}

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

    def _kernel(
        self, device: torch.device, dtype: torch.dtype, windows: bool, documents: bool = False
    ) -> AttentionKernel:
        """The kernel for these inputs, resolved once per kind of call (never per block)."""
        key = (device, dtype, windows, documents)
        if key not in self._kernels:
            self._kernels[key] = get_kernel(self.backend, device, dtype, windows, documents)
        return self._kernels[key]

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> HeadSplit:
        """Refuse what cannot run, before any communication; the heads' split if it can."""
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
        split = head_split(q.shape[2], k.shape[2], self.groups.ulysses_degree)
        if len({q.dtype, k.dtype, v.dtype}) > 1:
            raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if len({q.device, k.device, v.device}) > 1:
            raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
        self.layout.check_seq_len(q.shape[1] * self.groups.cp_size)
        chunks = self.head_chunks
        if chunks == 1 or split.ulysses_degree == 1:  # without ulysses, no chunks either
            return split
        if not split.even:
            raise ValueError(
                f"head_chunks={chunks} needs the query heads {split.num_q_heads} to split evenly "
                f"over ulysses_degree {split.ulysses_degree} (they split as {split.q_heads}); "
                "use head_chunks=1"
            )
        if split.q_heads[0] % chunks or split.kv_heads[0] % chunks:
            raise ValueError(
                f"head_chunks={chunks} must divide the query heads per rank {split.q_heads[0]} "
                f"and the key/value heads per rank {split.kv_heads[0]}"
            )
        return split

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
        split = self._check(q, k, v)
        window = check_window(window_size)
        kernel = self._kernel(q.device, q.dtype, window is not None)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        if self.groups.ulysses_degree == 1:
            return ring_attention(self.groups, self.layout, kernel, q, k, v, causal, scale, window)
        k, v = split.replicate_kv(k), split.replicate_kv(v)
        return _UlyssesRingFunction.apply(
            self.groups,
            self.layout,
            kernel,
            causal,
            scale,
            window,
            self.head_chunks,
            split,
            q,
            k,
            v,
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
        split = self._check(q, k, v)
        u = self.groups.ulysses_degree
        if not split.even:
            raise ValueError(
                f"packed documents need the query heads {q.shape[2]} to split evenly over "
                f"ulysses_degree {u} (they split as {split.q_heads}): choose U among the "
                f"divisors of {q.shape[2]}"
            )
        kernel = self._kernel(q.device, q.dtype, windows=False, documents=True)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        if u == 1:
            return ring_attention(self.groups, layout, kernel, q, k, v, causal, scale)
        k, v = split.replicate_kv(k), split.replicate_kv(v)
        return _PackedUlyssesRingFunction.apply(self.groups, layout, kernel, causal, scale, q, k, v)
