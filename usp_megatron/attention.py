"""``LongContextAttention``: Ulysses all-to-all around ring attention.

Each of the ``U x R`` ranks holds ``s_local = S / (U R)`` tokens (its layout's positions)
and all heads. The all-to-all over the ulysses group trades heads for sequence, so each
rank holds ``hq / U`` heads of its ring block (``S / R`` tokens); ring attention over the
ring group computes those heads over the whole sequence; the all-to-all back restores
the local shard with all heads. When ``U`` does not divide ``hq``, ulysses ranks hold
different numbers of heads (``heads.HeadSplit``).

The layout object is what every step asks: dense layouts and packed documents go through
the same pipeline (the layout says how the all-to-all moves its pieces and which block
pairs the ring computes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from usp_megatron.checks import check_positive_int, check_window
from usp_megatron.comm import heads_to_seq_start, seq_to_heads_start, split_heads
from usp_megatron.groups import USPGroups
from usp_megatron.heads import HeadSplit, head_split
from usp_megatron.kernels import AttentionKernel, check_backend, get_kernel
from usp_megatron.layout import (
    LayoutArg,
    PackedZigzagLayout,
    SequenceLayout,
    packed_layout,
    resolve_layout,
)
from usp_megatron.ring import ring_attention, ring_backward, ring_forward
from usp_megatron.sharding import gather_sequence, shard_sequence


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

    The layout decides how the pieces move (``comm.seq_to_heads_start``: straight into
    ring-block slots for dense layouts, through a staging index for packed documents) and
    what the ring computes; this function is the same for both.
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
            sent = outgoing[-1].sent  # the same values, in the layout dout arrives in
            out_saved = out_ring if sent is None else sent
            saved.append(_RingInputs(q_ring, k_ring, v_ring, out_saved, lse))
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


class LongContextAttention(nn.Module):
    """USP attention over ``groups``; inputs and output are this rank's sequence shard.

    The module is the one thing to hold: :attr:`layout` is the layout object its attention
    assumes, and :meth:`shard` / :meth:`gather` split and join full-sequence tensors with
    it. Packed documents get their own layout per batch (:meth:`packed_layout`), passed
    to :meth:`forward` as ``layout=`` (or built there from ``cu_seqlens``).
    """

    def __init__(
        self,
        groups: USPGroups,
        layout: LayoutArg = "zigzag",
        backend: str = "auto",
        head_chunks: int = 1,
        *,
        ring_impl: str | None = None,
    ) -> None:
        """``layout``: the sequence layout, by name (``zigzag``, ``stripe``, ``basic``) or as
        an object for these groups' degrees; ``ring_impl=`` is the same argument under its
        older name. ``head_chunks``: how many pieces the heads go through the all-to-all in,
        so that one chunk's all-to-all overlaps another's compute. 1 (no overlap) is the
        default; slower links may want 2 (docs/benchmarks.md has the measurements)."""
        super().__init__()
        if ring_impl is not None:
            if layout not in ("zigzag", ring_impl):
                raise ValueError(
                    f"layout={layout!r} and ring_impl={ring_impl!r} disagree: pass one of them"
                )
            layout = ring_impl
        check_backend(backend)
        check_positive_int("head_chunks", head_chunks, "no overlap")
        self.layout: SequenceLayout = resolve_layout(
            layout, groups.ulysses_degree, groups.ring_degree
        )
        if self.layout.masks_documents:
            raise ValueError(
                f"{self.layout!r} is one batch's packed documents: build the module with its "
                "ring layout ('zigzag') and pass packed layouts to forward(layout=...)"
            )
        #: The layout's name, as the flags and specs spell it.
        self.ring_impl = self.layout.name
        self.groups, self.backend = groups, backend
        self.head_chunks = head_chunks
        self._kernels: dict[tuple[torch.device, torch.dtype, bool, bool], AttentionKernel] = {}

    def shard(
        self, x: torch.Tensor, dim: int = 1, cu_seqlens_padded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This rank's positions of a full-sequence tensor ``x`` along ``dim``."""
        return shard_sequence(x, dim, self.groups, self._layout_of(cu_seqlens_padded))

    def gather(
        self, x_local: torch.Tensor, dim: int = 1, cu_seqlens_padded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The full sequence from every rank's shard (not differentiable)."""
        return gather_sequence(x_local, dim, self.groups, self._layout_of(cu_seqlens_padded))

    def _layout_of(self, cu_seqlens_padded: torch.Tensor | None) -> SequenceLayout:
        """The module's layout, or the packed one of these document boundaries."""
        return self.layout if cu_seqlens_padded is None else self.packed_layout(cu_seqlens_padded)

    def positions(self, seq_len: int) -> torch.Tensor:
        """Global positions this rank holds, in local order."""
        return self.layout.positions(seq_len, self.groups.ulysses_rank, self.groups.ring_rank)

    def packed_layout(
        self, cu_seqlens_padded: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> PackedZigzagLayout:
        """The packed-documents layout of these boundaries over this module's groups (reads
        them on the host once: build it once per batch and pass it as ``layout=``)."""
        u, r = self.groups.ulysses_degree, self.groups.ring_degree
        return packed_layout(self.ring_impl, u, r, cu_seqlens_padded, cu_seqlens)

    def _kernel(
        self, device: torch.device, dtype: torch.dtype, windows: bool, documents: bool
    ) -> AttentionKernel:
        """The kernel for these inputs, resolved once per kind of call (never per block)."""
        key = (device, dtype, windows, documents)
        if key not in self._kernels:
            self._kernels[key] = get_kernel(self.backend, device, dtype, windows, documents)
        return self._kernels[key]

    def _call_layout(
        self,
        layout: LayoutArg | None,
        cu_seqlens: torch.Tensor | None,
        cu_seqlens_padded: torch.Tensor | None,
    ) -> SequenceLayout:
        """The layout of this call: the module's own, a packed one passed in, or the packed
        one of ``cu_seqlens`` (built, or found in the cache of packings)."""
        u, r = self.groups.ulysses_degree, self.groups.ring_degree
        if layout is not None:
            if layout is not self.layout and not (
                isinstance(layout, SequenceLayout) and layout.masks_documents
            ):
                raise ValueError(
                    f"layout={layout!r} differs from the module's {self.layout!r}: pass a "
                    "packed layout from attn.packed_layout(...), or none"
                )
            return resolve_layout(layout, u, r)
        if cu_seqlens is None and cu_seqlens_padded is not None:
            raise ValueError(
                "cu_seqlens_padded was given without cu_seqlens: pass the real document "
                "boundaries as cu_seqlens (cu_seqlens_padded=None means no padding)"
            )
        if cu_seqlens is not None:
            padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
            return self.packed_layout(padded, cu_seqlens)
        return self.layout

    def _check(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout
    ) -> HeadSplit:
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
        if layout.masks_documents and q.shape[0] != 1:
            raise ValueError(
                f"packed documents need q of shape [1, s_local, heads, head_dim] (batch 1: "
                f"the documents are packed along the sequence), got {tuple(q.shape)}"
            )
        layout.check_seq_len(q.shape[1] * self.groups.cp_size)
        u = split.ulysses_degree
        if not layout.receives_into_slots and not split.even:
            raise ValueError(
                f"packed documents need the query heads {q.shape[2]} to split evenly over "
                f"ulysses_degree {u} (they split as {split.q_heads}): choose U among the "
                f"divisors of {q.shape[2]}"
            )
        chunks = self.head_chunks
        if chunks == 1 or u == 1:  # without ulysses, no chunks either
            return split
        if not split.even:
            raise ValueError(
                f"head_chunks={chunks} needs the query heads {split.num_q_heads} to split evenly "
                f"over ulysses_degree {u} (they split as {split.q_heads}); use head_chunks=1"
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
        layout: LayoutArg | None = None,
    ) -> torch.Tensor:
        """q: [b, s_local, hq, d]; k, v: [b, s_local, hkv, d] -> [b, s_local, hq, d].

        ``window_size=(left, right)``: the query at global position ``i`` sees keys
        ``i-left .. i+right`` (-1 unbounded; with ``causal`` also only keys ``<= i``);
        None or ``(-1, -1)`` is full attention.

        Packed documents (THD, batch 1): ``layout``, the packed layout of this batch
        (:meth:`packed_layout`, built once per batch), or ``cu_seqlens`` (int
        ``[documents + 1]``, global, the same on every rank: the real document boundaries)
        with ``cu_seqlens_padded`` (the padded ones; None: no padding), every padded length
        a multiple of ``2 * U * R``; the shard is Megatron's THD split
        (``shard_sequence(..., cu_seqlens_padded=)``). A token then attends only tokens of
        its own document (earlier-or-equal ones with ``causal``); padding rows give 0 and
        get no gradient.
        """
        layout = self._call_layout(layout, cu_seqlens, cu_seqlens_padded)
        window = check_window(window_size)
        layout.check_window(window)
        split = self._check(q, k, v, layout)
        kernel = self._kernel(q.device, q.dtype, window is not None, layout.masks_documents)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        if self.groups.ulysses_degree == 1:
            return ring_attention(self.groups, layout, kernel, q, k, v, causal, scale, window)
        k, v = split.replicate_kv(k), split.replicate_kv(v)
        return _UlyssesRingFunction.apply(
            self.groups, layout, kernel, causal, scale, window, self.head_chunks, split, q, k, v
        )
