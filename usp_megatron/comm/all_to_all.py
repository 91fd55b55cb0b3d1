"""The ulysses all-to-all: scatter heads, gather sequence, and back.

``[b, s_local, h, d]`` on each of ``U`` ranks becomes ``[b, U * s_local, h/U, d]``, the ring
block in position order, and back. Query, key and value are copied once each into one
send buffer (the all-to-all needs contiguous pieces anyway), and every piece is received
straight into its slot of the ring block (``SequenceLayout.gather_slots``): no reordering
copy runs on the way in, and the kernels read head slices of what arrived (one collective
per piece of a rank's shard: 2 for zigzag, 1 for basic and stripe). On the way out a
kernel's sequence-major output is sent slot by slot as it is; gradients are packed once.
The start / wait halves are separate so that the caller can overlap chunks of heads with
compute. Permuted copies move 8-byte words (``tensors.copy_words_``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from usp_megatron.layout import SequenceLayout
from usp_megatron.tensors import copy_words_

#: gloo has the list form of ``all_to_all`` from torch 2.13 on; before, pieces that are not
#: consecutive in one buffer travel by point-to-point instead.
GLOO_HAS_LIST_ALL_TO_ALL = torch.__version__ >= "2.13"


def split_heads(x: torch.Tensor, ulysses_degree: int, chunks: int) -> list[torch.Tensor]:
    """[b, s, h, d] -> ``chunks`` views [b, s, U, h/(U*chunks), d]: what each all-to-all sends.

    Chunk ``c`` holds, for every destination rank, the ``c``-th part of the heads that rank
    owns after the all-to-all, so each chunk is an independent all-to-all.
    """
    b, s, h, d = x.shape
    # [b, s, h, d] -> [b, s, U, chunks, h/(U*chunks), d]
    parts = x.reshape(b, s, ulysses_degree, chunks, h // (ulysses_degree * chunks), d)
    return [parts[:, :, :, c] for c in range(chunks)]


class PendingExchange:
    """All-to-alls in flight; ``wait()`` makes the current stream wait and returns the result.

    ``sent``: the sequence-major tensor [b, U*s, H, d] that went out (heads -> sequence),
    which the caller may keep instead of the kernel's own output (same values, and the
    layout the gradients arrive in).
    """

    def __init__(
        self,
        works: list,
        result: list[torch.Tensor],
        keep: list[torch.Tensor],
        finish: Callable[[], None] | None = None,
        sent: torch.Tensor | None = None,
    ) -> None:
        self._works, self._result, self._keep, self._finish = works, result, keep, finish
        self.sent = sent

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        if self._finish is not None:
            self._finish()
        self._works, self._keep, self._finish = [], [], None
        return self._result


def _consecutive(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The equal ``parts`` as one [n, *part] view, if they follow each other in one buffer."""
    first, numel = parts[0], parts[0].numel()
    for i, part in enumerate(parts):
        if part.data_ptr() != first.data_ptr() + i * numel * first.element_size():
            return None
    return first.as_strided((len(parts), *first.shape), (numel, *first.stride()))


def _point_to_point(
    outputs: list[torch.Tensor], inputs: list[torch.Tensor], group: ProcessGroup
) -> list:
    """The list-form all-to-all as sends and receives (own piece copied locally)."""
    me = dist.get_rank(group)
    outputs[me].copy_(inputs[me])
    ops = []
    for peer in range(len(inputs)):
        if peer != me:
            global_peer = dist.get_global_rank(group, peer)
            ops.append(dist.P2POp(dist.isend, inputs[peer].contiguous(), global_peer, group))
            ops.append(dist.P2POp(dist.irecv, outputs[peer], global_peer, group))
    return dist.batch_isend_irecv(ops) if ops else []


def _exchange_piece(
    outputs: list[torch.Tensor], inputs: list[torch.Tensor], group: ProcessGroup
) -> list:
    """One all-to-all of equal contiguous pieces: a single-tensor call where both sides are
    consecutive in one buffer (fewer host calls), else the list form."""
    out, inp = _consecutive(outputs), _consecutive(inputs)
    if out is not None and inp is not None:
        return [dist.all_to_all_single(out, inp, group=group, async_op=True)]
    if not GLOO_HAS_LIST_ALL_TO_ALL and dist.get_backend(group) == "gloo":
        return _point_to_point(outputs, inputs, group)
    return [dist.all_to_all(outputs, inputs, group=group, async_op=True)]


def seq_to_heads_start(
    tensors: list[torch.Tensor], layout: SequenceLayout, group: ProcessGroup
) -> PendingExchange:
    """Views [b, s, U, h_i, d] (``split_heads``) -> after ``wait()``: [b, U*s, h_i, d] each.

    The tensors are packed along heads into one send buffer (one copy each); every piece
    is received straight into its ring-block slot of one sequence-major buffer, so no
    reordering copy runs; the results are head slices of that buffer.
    """
    degree, pieces = layout.ulysses_degree, layout.pieces_per_rank
    b, s, _, _, d = tensors[0].shape
    heads = [t.shape[3] for t in tensors]
    piece_len = s // pieces
    send = tensors[0].new_empty(pieces, degree, piece_len, b, sum(heads), d)
    recv = tensors[0].new_empty(degree * s, b, sum(heads), d)  # the ring block, seq-major
    result, start = [], 0
    for t, h in zip(tensors, heads):
        # [b, s, U, h, d] -> [b, pieces, piece_len, U, h, d] -> [pieces, U, piece_len, b, h, d]
        by_piece = t.view(b, pieces, piece_len, degree, h, d).permute(1, 3, 2, 0, 4, 5)
        copy_words_(send[..., start : start + h, :], by_piece)
        # [U*s, b, h, d] -> [b, U*s, h, d]
        result.append(recv[:, :, start : start + h].transpose(0, 1))
        start += h
    works = []
    for i in range(pieces):
        slots = [recv[j * piece_len : (j + 1) * piece_len] for j in layout.gather_slots[i]]
        works += _exchange_piece(slots, list(send[i].unbind(0)), group)
    return PendingExchange(works, result, [send])


def heads_to_seq_start(
    tensors: list[torch.Tensor],
    destinations: list[torch.Tensor],
    layout: SequenceLayout,
    group: ProcessGroup,
) -> PendingExchange:
    """[b, U*s, h_i, d] each (ring-block order) -> after ``wait()``: copied into the views
    [b, s, U, h_i, d] ``destinations``. The inverse of :func:`seq_to_heads_start`.

    One sequence-major tensor is sent slot by slot as it is; otherwise the tensors are
    packed along heads into a sequence-major buffer first (one copy each).
    """
    degree, pieces = layout.ulysses_degree, layout.pieces_per_rank
    b, block_len, _, d = tensors[0].shape
    heads = [t.shape[2] for t in tensors]
    piece_len = block_len // (degree * pieces)
    send = tensors[0].transpose(0, 1)  # [b, U*s, h, d] -> [U*s, b, h, d]
    if len(tensors) > 1 or not send.is_contiguous():
        send = tensors[0].new_empty(block_len, b, sum(heads), d)
        start = 0
        for t, h in zip(tensors, heads):
            copy_words_(send[:, :, start : start + h], t.transpose(0, 1))
            start += h
    recv = tensors[0].new_empty(pieces, degree, piece_len, b, sum(heads), d)
    works = []
    for i in range(pieces):
        slots = [send[j * piece_len : (j + 1) * piece_len] for j in layout.gather_slots[i]]
        works += _exchange_piece(list(recv[i].unbind(0)), slots, group)

    def finish() -> None:
        start = 0
        for dest, h in zip(destinations, heads):
            # [pieces, U, piece_len, b, h, d] -> [b, pieces, piece_len, U, h, d]
            src = recv[..., start : start + h, :].permute(3, 0, 2, 1, 4, 5)
            copy_words_(dest.view(b, pieces, piece_len, degree, h, d), src)
            start += h

    return PendingExchange(
        works, list(destinations), [send, recv], finish, sent=send.transpose(0, 1)
    )
