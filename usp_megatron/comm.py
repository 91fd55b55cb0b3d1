"""Communication: the ulysses all-to-all and the ring's neighbour exchange.

All-to-all: ``[b, s_local, h, d]`` on each of ``U`` ranks becomes ``[b, U * s_local, h/U, d]``
(scatter heads, gather sequence) and back. Query, key and value are copied once each into
one send buffer (the all-to-all needs contiguous pieces anyway), and every piece is
received straight into its slot of the ring block (``layout.gather_piece_order``): no
reordering copy runs on the way in, and the kernels read head slices of what arrived
(one collective per piece of a rank's shard: 2 for zigzag, 1 for basic and stripe). On
the way out a kernel's sequence-major output is sent slot by slot as it is; gradients are
packed once. The start / wait halves are separate so that the caller can overlap chunks
of heads with compute. Permuted copies move 8-byte words (``copy_words_``).

Ring: ``RingExchange.start(t)`` sends ``t`` to the next ring rank and receives the previous
rank's tensor with ``batch_isend_irecv``; ``wait()`` returns it. The caller computes in
between, so the transfer overlaps the current block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from usp_megatron.layout import gather_piece_order, pieces_per_rank


class RingExchange:
    """Point-to-point send to the next rank and receive from the previous one in a ring."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (rank + 1) % self.size)
        self.prev_rank = dist.get_global_rank(group, (rank - 1) % self.size)
        self._works: list = []
        self._outgoing: torch.Tensor | None = None  # kept alive until the send completes
        self._incoming: torch.Tensor | None = None

    def start(self, tensor: torch.Tensor) -> None:
        if self._works:
            raise RuntimeError("RingExchange.start called twice without wait()")
        self._outgoing = tensor = tensor.contiguous()
        self._incoming = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.next_rank, self.group),
            dist.P2POp(dist.irecv, self._incoming, self.prev_rank, self.group),
        ]
        self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._works, self._outgoing = [], None
        incoming, self._incoming = self._incoming, None
        return incoming


class GatherLayout:
    """Where each gathered piece of one all-to-all goes in the ring block."""

    def __init__(self, ulysses_degree: int, ring_impl: str) -> None:
        self.degree = ulysses_degree
        self.pieces = pieces_per_rank(ring_impl)
        # order[j] = gathered piece (source rank u, piece i) as u * pieces + i, for slot j.
        self.order = gather_piece_order(ulysses_degree, ring_impl)
        # slot[i][u]: the ring-block slot of piece i of ulysses rank u.
        slot_of = {piece: j for j, piece in enumerate(self.order)}
        self.slot = [
            [slot_of[u * self.pieces + i] for u in range(ulysses_degree)]
            for i in range(self.pieces)
        ]


def split_heads(x: torch.Tensor, ulysses_degree: int, chunks: int) -> list[torch.Tensor]:
    """[b, s, h, d] -> ``chunks`` views [b, s, U, h/(U*chunks), d]: what each all-to-all sends.

    Chunk ``c`` holds, for every destination rank ``u``, the ``c``-th part of the heads that
    rank ``u`` owns after the all-to-all, so each chunk is an independent all-to-all.
    """
    b, s, h, d = x.shape
    parts = x.reshape(b, s, ulysses_degree, chunks, h // (ulysses_degree * chunks), d)
    return [parts[:, :, :, c] for c in range(chunks)]


def _as_words(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` viewed as int64 words along its last dim, if its strides and offset allow."""
    size = x.element_size()
    if size >= 8 or x.dim() == 0 or x.stride(-1) != 1 or x.shape[-1] * size % 8:
        return None
    if x.storage_offset() * size % 8 or any(st * size % 8 for st in x.stride()[:-1]):
        return None
    return x.view(torch.int64)


def copy_words_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for same-dtype tensors, moving 8-byte words where the layout allows.

    A permuted copy of 2-byte elements runs the element-wise kernel at a fraction of the
    memory bandwidth; the same bytes moved as int64 words need a quarter of the index work.
    """
    words = (_as_words(dst), _as_words(src)) if dst.dtype == src.dtype else (None, None)
    if words[0] is not None and words[1] is not None:
        words[0].copy_(words[1])
    else:
        dst.copy_(src)
    return dst


class PendingExchange:
    """All-to-alls in flight; ``wait()`` makes the current stream wait and returns the result.

    ``sent``: the sequence-major tensor [b, U*s, H, d] that went out (heads -> sequence),
    which the caller may keep instead of the kernel's own output (same values, and the
    layout the gradients arrive in).
    """

    def __init__(self, works: list, result: list[torch.Tensor], keep: list[torch.Tensor],
                 finish: Callable[[], None] | None = None, sent: torch.Tensor | None = None):
        self._works, self._result, self._keep, self._finish = works, result, keep, finish
        self.sent = sent

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        if self._finish is not None:
            self._finish()
        self._works, self._keep, self._finish = [], [], None
        return self._result


def _exchange_piece(outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                    group: ProcessGroup) -> object:
    """One all-to-all of equal contiguous pieces: a single-tensor call where both sides are
    consecutive in one buffer (fewer host calls), else the list form."""
    def joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
        first, n = parts[0], parts[0].numel()
        for i, part in enumerate(parts):
            if part.data_ptr() != first.data_ptr() + i * n * first.element_size():
                return None
        return first.as_strided((len(parts), *first.shape), (n, *first.stride()))

    out, inp = joined(outputs), joined(inputs)
    if out is not None and inp is not None:
        return dist.all_to_all_single(out, inp, group=group, async_op=True)
    return dist.all_to_all(outputs, inputs, group=group, async_op=True)


def seq_to_heads_start(
    tensors: list[torch.Tensor], layout: GatherLayout, group: ProcessGroup
) -> PendingExchange:
    """Views [b, s, U, h_i, d] (``split_heads``) -> after ``wait()``: [b, U*s, h_i, d] each.

    The tensors are packed along heads into one send buffer [pieces, U, s/pieces, b, H, d]
    (one copy each: the all-to-all needs contiguous pieces anyway); every piece is received
    straight into its ring-block slot of one sequence-major buffer [U*s, b, H, d], so no
    reordering copy runs; the results are head slices of that buffer.
    """
    u, k = layout.degree, layout.pieces
    b, s, _, _, d = tensors[0].shape
    heads = [t.shape[3] for t in tensors]
    p = s // k
    send = tensors[0].new_empty(k, u, p, b, sum(heads), d)
    recv = tensors[0].new_empty(u * s, b, sum(heads), d)
    result, start = [], 0
    for t, h in zip(tensors, heads):
        dst = send[..., start : start + h, :]
        copy_words_(dst, t.view(b, k, p, u, h, d).permute(1, 3, 2, 0, 4, 5))
        result.append(recv[:, :, start : start + h].transpose(0, 1))
        start += h
    works = [
        _exchange_piece([recv[j * p : (j + 1) * p] for j in layout.slot[i]],
                        list(send[i].unbind(0)), group)
        for i in range(k)
    ]
    return PendingExchange(works, result, [send])


def heads_to_seq_start(
    tensors: list[torch.Tensor],
    destinations: list[torch.Tensor],
    layout: GatherLayout,
    group: ProcessGroup,
) -> PendingExchange:
    """[b, U*s, h_i, d] each (ring-block order) -> after ``wait()``: copied into the views
    [b, s, U, h_i, d] ``destinations``. The inverse of :func:`seq_to_heads_start`.

    One sequence-major tensor is sent slot by slot as it is; otherwise the tensors are
    packed along heads into a sequence-major buffer first (one copy each).
    """
    u, k = layout.degree, layout.pieces
    b, s_full, _, d = tensors[0].shape
    heads = [t.shape[2] for t in tensors]
    p = s_full // (u * k)
    send = tensors[0].transpose(0, 1)
    if len(tensors) > 1 or not send.is_contiguous():
        send = tensors[0].new_empty(s_full, b, sum(heads), d)
        start = 0
        for t, h in zip(tensors, heads):
            copy_words_(send[:, :, start : start + h], t.transpose(0, 1))
            start += h
    recv = tensors[0].new_empty(k, u, p, b, sum(heads), d)
    works = [
        _exchange_piece(list(recv[i].unbind(0)),
                        [send[j * p : (j + 1) * p] for j in layout.slot[i]], group)
        for i in range(k)
    ]

    def finish() -> None:
        start = 0
        for dest, h in zip(destinations, heads):
            src = recv[..., start : start + h, :].permute(3, 0, 2, 1, 4, 5)
            copy_words_(dest.view(b, k, p, u, h, d), src)
            start += h

    return PendingExchange(works, list(destinations), [send, recv], finish,
                           sent=send.transpose(0, 1))
