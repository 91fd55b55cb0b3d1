"""``LongContextAttention``: Ulysses all-to-all around ring attention.

Each of the ``U x R`` ranks holds ``s = S / (U R)`` tokens (its layout's positions) and all
heads. The all-to-all over the ulysses group trades heads for sequence, so each rank holds
``h_u`` of the heads (``h / U`` when ``U`` divides them; ``heads.HeadSplit``) over its ring
block (``U*s = S / R`` tokens); ring attention over the ring group computes those heads
over the whole sequence; the all-to-all back restores the local shard with all heads.

One forward decides everything (groups, layout, kernel, mask, head split) into an
``AttentionCall`` that the all-to-all, the ring and the backward share; dense layouts and
packed documents go through the same pipeline (the layout says how the all-to-all places
its pieces and which block pairs the ring computes).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from usp_megatron.call import AttentionCall
from usp_megatron.checks import check_positive_int, check_window, renamed_keyword
from usp_megatron.comm import heads_to_seq_start, seq_to_heads_start, split_heads
from usp_megatron.groups import USPGroups, gather_ints
from usp_megatron.heads import HeadSplit, head_split
from usp_megatron.kernels import AttentionKernel, check_backend, get_kernel
from usp_megatron.layout import LayoutArg, SequenceLayout, resolve_layout
from usp_megatron.ring import RingInputs, ring_attention, ring_backward, ring_forward
from usp_megatron.sharding import gather_sequence, shard_sequence

#: Where the sequence and batch dims are in q, k, v and the output: ``bshd`` is
#: FlashAttention's and YunChang's order, ``sbhd`` Megatron's.
QKV_FORMATS = ("bshd", "sbhd")
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


class _UlyssesRingFunction(torch.autograd.Function):
    """All-to-all in, ring attention, all-to-all out; the backward mirrors it.

    Forward, for each of ``call.head_chunks`` slices of the heads (all all-to-alls are
    started up front, so chunk ``c + 1`` travels while chunk ``c`` computes):

    1. ``seq_to_heads``: this rank's ``[b, s, h, d]`` shard of q, k, v becomes
       ``[b, U*s, h_u, d]``: the ``h_u`` heads of ulysses rank ``u`` over the whole ring
       block, in position order.
    2. ring attention over the ring group on those heads: ``out``, ``lse``.
    3. ``heads_to_seq``: ``out`` goes back to ``[b, s, h, d]``.

    Backward: ``dout`` takes step 1's path, the ring's backward gives dq, dk, dv of the
    ring block, and step 3's path takes them home.
    """

    @staticmethod
    def forward(ctx, call: AttentionCall, q, k, v):
        group, layout, chunks = call.groups.ulysses_group, call.layout, call.head_chunks
        q_runs, kv_runs = call.heads.q_runs, call.heads.kv_runs
        with_runs = ((q, q_runs), (k, kv_runs), (v, kv_runs))
        sends = zip(*(split_heads(t, runs, chunks) for t, runs in with_runs))
        incoming = [seq_to_heads_start(list(qkv), layout, group) for qkv in sends]
        out = q.new_empty(q.shape)  # [b, s, hq, d], contiguous: split_heads gives views
        saved: list[RingInputs] = []
        outgoing = []
        for pending, destination in zip(incoming, split_heads(out, q_runs, chunks)):
            q_ring, k_ring, v_ring = pending.wait()  # [b, U*s, h_u / chunks, d] each
            out_ring, lse = ring_forward(call, q_ring, k_ring, v_ring)
            outgoing.append(heads_to_seq_start([out_ring], [destination], layout, group))
            sent = outgoing[-1].sent  # the same values, in the layout dout arrives in
            out_saved = out_ring if sent is None else sent
            saved.append(RingInputs(q_ring, k_ring, v_ring, out_saved, lse))
        for pending in outgoing:
            pending.wait()
        ctx.save_for_backward(*(t for inputs in saved for t in inputs))
        ctx.call, ctx.kv_shape = call, k.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        call = ctx.call
        group, layout, chunks = call.groups.ulysses_group, call.layout, call.head_chunks
        q_runs, kv_runs = call.heads.q_runs, call.heads.kv_runs
        per_chunk = len(RingInputs._fields)
        flat = ctx.saved_tensors
        saved = [RingInputs(*flat[i : i + per_chunk]) for i in range(0, len(flat), per_chunk)]
        incoming = [
            seq_to_heads_start([chunk], layout, group)
            for chunk in split_heads(dout, q_runs, chunks)
        ]
        dq = dout.new_empty(dout.shape)  # [b, s, hq, d]
        dk, dv = (dout.new_empty(ctx.kv_shape) for _ in range(2))  # [b, s, hkv_sent, d]
        with_runs = ((dq, q_runs), (dk, kv_runs), (dv, kv_runs))
        destinations = zip(*(split_heads(t, runs, chunks) for t, runs in with_runs))
        outgoing = []
        for pending, inputs, destination in zip(incoming, saved, destinations):
            (dout_ring,) = pending.wait()  # [b, U*s, h_u / chunks, d]
            grads = ring_backward(call, dout_ring, inputs)
            outgoing.append(heads_to_seq_start(list(grads), list(destination), layout, group))
        for pending in outgoing:
            pending.wait()
        return None, dq, dk, dv


class LongContextAttention(nn.Module):
    """USP attention over ``groups``; inputs and output are this rank's sequence shard.

    The module is the one thing to hold: :attr:`layout` is the layout object its attention
    assumes, and :meth:`shard` / :meth:`gather` split and join full-sequence tensors with
    it. Packed documents get their own layout per batch (:meth:`packed_layout`, derived
    from the module's), passed to :meth:`forward` as ``layout=`` (or built there from
    ``cu_seqlens``).
    """

    def __init__(
        self,
        groups: USPGroups,
        layout: LayoutArg = "zigzag",
        backend: str = "auto",
        head_chunks: int = 1,
        *,
        qkv_format: str = "bshd",
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        ring_impl: str | None = None,
    ) -> None:
        """``layout``: the sequence layout, by name (``zigzag``, ``stripe``, ``basic``) or as
        an object for these groups' degrees (``ring_impl=`` is its old name). ``head_chunks``:
        how many pieces the heads go through the all-to-all in, so that one chunk's
        all-to-all overlaps another's compute. 1 (no overlap) is the default; slower links
        may want 2 (docs/benchmarks.md has the measurements).

        ``qkv_format``: the order of q, k, v and the output, ``bshd`` (``[b, s, h, d]``)
        or Megatron's ``sbhd``. ``num_heads``, ``num_kv_heads``, ``head_dim``: what the
        caller expects (each optional); every call checks q, k, v against them, so a
        tensor in another order (e.g. ``[b, h, s, d]``) is refused instead of being read
        with its heads as the sequence."""
        super().__init__()
        layout = renamed_keyword(
            "LongContextAttention", "ring_impl", "layout", ring_impl, layout, "zigzag"
        )
        check_backend(backend)
        check_positive_int("head_chunks", head_chunks, "no overlap")
        if qkv_format not in QKV_FORMATS:
            raise ValueError(
                f"qkv_format must be one of {QKV_FORMATS} (bshd: [b, s, h, d]; sbhd: Megatron's "
                f"[s, b, h, d]), got {qkv_format!r}"
            )
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):  # fmt: skip
            if value is not None:
                check_positive_int(name, value)
        self.layout: SequenceLayout = resolve_layout(
            layout, groups.ulysses_degree, groups.ring_degree
        )
        if self.layout.masks_documents:
            raise ValueError(
                f"{self.layout!r} is one batch's packed documents: build the module with its "
                "dense layout ('zigzag') and pass packed layouts to forward(layout=...)"
            )
        self.groups, self.backend = groups, backend
        self.head_chunks = head_chunks
        self.qkv_format = qkv_format
        #: The sequence dim of q, k, v and the output (and the default of shard/gather).
        self.seq_dim = qkv_format.index("s")
        self.expected = {"heads": num_heads, "kv_heads": num_kv_heads, "head_dim": head_dim}
        self._kernels: dict[tuple[torch.device, torch.dtype, bool, bool], AttentionKernel] = {}
        self._agreed: tuple[int, ...] | None = None  # the inputs every rank last agreed on

    def shard(
        self,
        x: torch.Tensor,
        dim: int | None = None,
        cu_seqlens_padded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's positions of a full-sequence tensor ``x`` along ``dim`` (default: the
        sequence dim of ``qkv_format``)."""
        dim = self.seq_dim if dim is None else dim
        return shard_sequence(x, dim, self.groups, self.layout, cu_seqlens_padded)

    def gather(
        self,
        x_local: torch.Tensor,
        dim: int | None = None,
        cu_seqlens_padded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The full sequence from every rank's shard (not differentiable)."""
        dim = self.seq_dim if dim is None else dim
        return gather_sequence(x_local, dim, self.groups, self.layout, cu_seqlens_padded)

    def positions(self, seq_len: int) -> torch.Tensor:
        """Global positions ``[s]`` this rank holds, in local order."""
        return self.layout.positions(seq_len, self.groups.ulysses_rank, self.groups.ring_rank)

    def packed_layout(
        self, cu_seqlens_padded: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> SequenceLayout:
        """The packed-documents layout of these boundaries, derived from the module's (reads
        them on the host once: build it once per batch and pass it as ``layout=``)."""
        return self.layout.packed(cu_seqlens_padded, cu_seqlens)

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
        if layout is not None:
            if layout is not self.layout and not (
                isinstance(layout, SequenceLayout) and layout.masks_documents
            ):
                raise ValueError(
                    f"layout={layout!r} differs from the module's {self.layout!r}: pass a "
                    "packed layout from attn.packed_layout(...), or none"
                )
            return resolve_layout(layout, self.groups.ulysses_degree, self.groups.ring_degree)
        if cu_seqlens is None and cu_seqlens_padded is not None:
            raise ValueError(
                "cu_seqlens_padded was given without cu_seqlens: pass the real document "
                "boundaries as cu_seqlens (cu_seqlens_padded=None means no padding)"
            )
        if cu_seqlens is not None:
            padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
            return self.packed_layout(padded, cu_seqlens)
        return self.layout

    @property
    def _dims(self) -> str:
        """The order of q, k, v in words, as messages name it."""
        words = {"b": "b", "s": "s_local", "h": "heads", "d": "head_dim"}
        return "[" + ", ".join(words[letter] for letter in self.qkv_format) + "]"

    def _check_format(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """q, k, v are 4-D in ``qkv_format`` and have the heads and head_dim the caller
        stated: a tensor in another order would otherwise be read with the wrong dims."""
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"q, k, v must be {self._dims} (qkv_format={self.qkv_format!r}); got shapes "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        heads_dim = self.qkv_format.index("h")
        expected = self.expected
        for name, t, key, dim in (
            ("q", q, "heads", heads_dim), ("k", k, "kv_heads", heads_dim),
            ("v", v, "kv_heads", heads_dim), ("q", q, "head_dim", 3),
        ):  # fmt: skip
            want = expected[key]
            if want is None or t.shape[dim] == want:
                continue
            stated = {"heads": "num_heads", "kv_heads": "num_kv_heads"}.get(key, key)
            hint = next(
                (f"; its dim {i} has {want}: was it meant to be transposed? (e.g. "
                 f"{name}.transpose({i}, {dim}))" for i in range(4)
                 if i != dim and t.shape[i] == want),
                "",
            )  # fmt: skip
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} read as {self._dims} (qkv_format="
                f"{self.qkv_format!r}) has {t.shape[dim]} at dim {dim}, but the module was "
                f"built with {stated}={want}{hint}"
            )

    def _check(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout
    ) -> HeadSplit:
        """Refuse what cannot run, before any communication; the heads' split if it can.
        q, k, v: ``[b, s, h, d]``."""
        if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(
                f"k and v must match q in batch, sequence and head_dim and each other; got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if q.shape[3] < 1:
            raise ValueError(f"head_dim must be at least 1, got q of shape {tuple(q.shape)}")
        split = head_split(q.shape[2], k.shape[2], self.groups.ulysses_degree)
        if len({q.dtype, k.dtype, v.dtype}) > 1:
            raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if q.dtype not in _DTYPE_CODES:
            names = ", ".join(str(t).removeprefix("torch.") for t in _DTYPE_CODES)
            raise ValueError(f"q, k, v must be floating point ({names}), got {q.dtype}")
        if len({q.device, k.device, v.device}) > 1:
            raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
        if layout.masks_documents and q.shape[0] != 1:
            raise ValueError(
                f"packed documents need q of shape [1, s_local, heads, head_dim] (batch 1: "
                f"the documents are packed along the sequence), got {tuple(q.shape)}"
            )
        layout.check_seq_len(q.shape[1] * self.groups.cp_size)
        u = split.ulysses_degree
        if not layout.ulysses_placement.takes_uneven_heads and not split.even:
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
        """q: [b, s, hq, d]; k, v: [b, s, hkv, d] (this rank's shard) -> [b, s, hq, d]
        (with ``qkv_format="sbhd"``: [s, b, h, d] in and out).

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
        self._check_format(q, k, v)
        if self.seq_dim == 0:  # sbhd -> bshd (views)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        split = self._check(q, k, v, layout)
        self._check_peers(q, k, causal, window, layout.masks_documents)
        if softmax_scale is not None and not (
            isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
        ):
            raise ValueError(
                f"softmax_scale must be a finite number (None: 1 / sqrt(head_dim)), got "
                f"{softmax_scale!r}"
            )
        call = AttentionCall(
            groups=self.groups,
            layout=layout,
            kernel=self._kernel(q.device, q.dtype, window is not None, layout.masks_documents),
            causal=causal,
            scale=softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5,
            window=window,
            heads=split,
            head_chunks=self.head_chunks if split.ulysses_degree > 1 else 1,
        )
        if self.groups.ulysses_degree == 1:
            out = ring_attention(call, q, k, v)
        else:
            # [b, s, hkv, d] -> [b, s, sum(kv_heads), d]: the key/value heads each rank needs
            k, v = split.replicate_kv(k), split.replicate_kv(v)
            out = _UlyssesRingFunction.apply(call, q, k, v)
        return out.transpose(0, 1) if self.seq_dim == 0 else out

    def _check_peers(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        causal: bool,
        window: tuple[int, int] | None,
        packed: bool,
    ) -> None:
        """Every rank of the context-parallel group must pass the same shapes, dtype, mask
        and window: a rank whose shard differs would end the all-to-all in a gloo crash, an
        NCCL hang or a wrong result. One small all-gather says which rank passed what, on a
        module's first call and whenever this rank's inputs change (a fixed shape pays it
        once: reading its result waits for the device). Packed documents change their
        length every batch, so theirs is left out (the batch split compares the documents
        themselves): a packed model pays the all-gather once, not once per layer and
        batch."""
        groups = self.groups
        q_shape, k_shape = list(q.shape), list(k.shape)
        if packed:
            q_shape[1] = k_shape[1] = -1
        signature = (
            *q_shape, *k_shape, _DTYPE_CODES.get(q.dtype, 0), int(causal), *(window or (-2, -2))
        )  # fmt: skip
        if groups.cp_size == 1 or signature == self._agreed:
            return
        pairs = [(groups.cp_group, groups.cp_size)] if groups.cp_group is not None else [
            (groups.ulysses_group, groups.ulysses_degree), (groups.ring_group, groups.ring_degree)
        ]  # fmt: skip
        for group, size in pairs:
            if size == 1:
                continue
            seen = gather_ints(signature, group, size, q.device)
            if len(set(seen)) > 1:
                ranks = dist.get_process_group_ranks(group)
                raise ValueError(
                    "the ranks of one USP group passed different inputs ("
                    + "; ".join(
                        f"rank{'s' if len(who) > 1 else ''} {', '.join(map(str, who))}: "
                        f"{_describe_inputs(values, self.qkv_format)}"
                        for values, who in _ranks_by_value(seen, ranks).items()
                    )
                    + "): every rank passes its shard of the same batch, the same b, heads and "
                    "head_dim and s_local = S / (U x R) tokens, with the same causal and window"
                )
        self._agreed = signature


def _ranks_by_value(seen: list[tuple[int, ...]], ranks: list[int]) -> dict[tuple, list[int]]:
    """Global ranks grouped by the inputs they passed, in order of first appearance."""
    grouped: dict[tuple, list[int]] = {}
    for values, rank in zip(seen, ranks):
        grouped.setdefault(values, []).append(rank)
    return grouped


def _describe_inputs(values: tuple[int, ...], qkv_format: str) -> str:
    """One rank's :meth:`LongContextAttention._check_peers` signature, in words."""
    q, k, dtype, causal, window = values[:4], values[4:8], values[8], values[9], values[10:]
    if qkv_format == "sbhd":  # shapes as the caller passed them
        q, k = ((shape[1], shape[0], *shape[2:]) for shape in (q, k))
    dtypes = {code: str(t).removeprefix("torch.") for t, code in _DTYPE_CODES.items()}
    return (
        f"q {list(q)}, k/v {list(k)}, {dtypes.get(dtype, 'other dtype')}, "
        f"{'causal' if causal else 'not causal'}, "
        f"window {tuple(window) if window[0] != -2 else None}"
    )
