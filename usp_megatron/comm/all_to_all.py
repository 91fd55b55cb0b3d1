"""The ulysses all-to-all of dense layouts: scatter heads, gather sequence, and back.

``[b, s, h, d]`` on each of ``U`` ranks becomes ``[b, U*s, h_u, d]``, the ring block in
position order, and back. Query, key and value are copied once each into
one send buffer (the all-to-all needs contiguous pieces anyway), and every piece is
received straight into its slot of the ring block (``UlyssesPlacement.slots``): no
reordering copy runs on the way in, and the kernels read head slices of what arrived (one
collective per piece of a rank's shard: 2 for zigzag, 1 for basic and stripe). On the way
out a kernel's sequence-major output is sent slot by slot as it is; gradients are packed
once. The start / wait halves are separate so that the caller can overlap chunks of heads
with compute. Permuted copies move 8-byte words (``tensors.copy_words_``).

Uneven heads: when ulysses ranks receive different numbers of heads, consecutive ranks
that receive equally many form a *run* (``HeadRun``); each run is packed like an even split
(one copy per tensor and run), and the pieces, now of different sizes, go with split sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from usp_megatron.heads import HeadRun
from usp_megatron.layout import UlyssesPlacement
from usp_megatron.tensors import copy_words_

#: gloo runs collectives on a worker thread, which lets go of a finished collective's
#: tensors after its handle completed, at times after the interpreter began to exit: a
#: forward-only script whose last step was an all-to-all then aborted at exit
#: (``terminate called without an active exception``). Sends and receives run in the
#: calling thread and are released there, so on gloo (CPU processes: tests, demos) every
#: all-to-all travels as those. Tests set this to run the collective forms on gloo.
GLOO_COLLECTIVES = False
#: gloo has the list form of ``all_to_all`` from torch 2.13 on, for pieces of equal size
#: only; other pieces that are not consecutive in one buffer travel by point-to-point.
#: (Compared as numbers: as strings, "2.9" would pass.)
GLOO_HAS_LIST_ALL_TO_ALL = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 13)


def split_heads(
    x: torch.Tensor, runs: Sequence[HeadRun], chunks: int = 1
) -> list[list[torch.Tensor]]:
    """[b, s, h, d] -> for each of ``chunks``: one view [b, s, ranks, heads/chunks, d] per
    run of ``runs`` (which cover the ``h`` heads in rank order): what each all-to-all sends.

    An even split is one run of all ``U`` ranks. Chunk ``c`` holds, for every destination
    rank, the ``c``-th part of the heads that rank owns after the all-to-all, so each chunk
    is an independent all-to-all.
    """
    b, s, _, d = x.shape
    per_chunk: list[list[torch.Tensor]] = [[] for _ in range(chunks)]
    start = 0
    for run in runs:
        run_heads = x if len(runs) == 1 else x.narrow(2, start, run.ranks * run.heads)
        # [b, s, ranks * heads, d] -> [b, s, ranks, chunks, heads/chunks, d]
        parts = run_heads.reshape(b, s, run.ranks, chunks, run.heads // chunks, d)
        for c in range(chunks):
            per_chunk[c].append(parts[:, :, :, c])
        start += run.ranks * run.heads
    return per_chunk


class PendingExchange:
    """All-to-alls in flight; ``wait()`` makes the current stream wait and returns the result.

    ``sent``: the sequence-major tensor [b, U*s, h, d] that went out (heads -> sequence),
    which the caller may keep instead of the kernel's own output (same values, and the
    layout the gradients arrive in).
    """

    def __init__(
        self,
        works: list,
        result: list,
        keep: list[torch.Tensor],
        finish: Callable[[], None] | None = None,
        sent: torch.Tensor | None = None,
    ) -> None:
        self._works, self._result, self._keep, self._finish = works, result, keep, finish
        self.sent = sent

    def wait(self) -> list:
        for work in self._works:
            work.wait()
        if self._finish is not None:
            self._finish()
        self._works, self._keep, self._finish = [], [], None
        return self._result


def _consecutive(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The contiguous ``parts`` of one buffer as one flat view, if each starts where the one
    before ends."""
    end, numel = parts[0].data_ptr(), 0
    for part in parts:
        if part.data_ptr() != end or not part.is_contiguous():
            return None
        end += part.numel() * part.element_size()
        numel += part.numel()
    return parts[0].as_strided((numel,), (1,))


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


def exchange_pieces(
    outputs: list[torch.Tensor], inputs: list[torch.Tensor], group: ProcessGroup
) -> list:
    """One all-to-all of contiguous pieces (``inputs[j]`` to rank ``j``, ``outputs[j]`` from
    it): a single-tensor call where both sides are consecutive in one buffer (fewer host
    calls; with split sizes where the pieces differ), else the list form; on gloo, sends
    and receives (``GLOO_COLLECTIVES``)."""
    gloo = dist.get_backend(group) == "gloo"
    if gloo and not GLOO_COLLECTIVES:
        return _point_to_point(outputs, inputs, group)
    out, inp = _consecutive(outputs), _consecutive(inputs)
    out_sizes, in_sizes = [p.numel() for p in outputs], [p.numel() for p in inputs]
    equal = out_sizes.count(out_sizes[0]) == len(out_sizes) and (
        in_sizes.count(in_sizes[0]) == len(in_sizes)
    )
    if out is not None and inp is not None:
        splits = (None, None) if equal else (out_sizes, in_sizes)
        return [dist.all_to_all_single(out, inp, *splits, group=group, async_op=True)]
    if gloo and not (equal and GLOO_HAS_LIST_ALL_TO_ALL):
        return _point_to_point(outputs, inputs, group)
    return [dist.all_to_all(outputs, inputs, group=group, async_op=True)]


class _RunBuffer(NamedTuple):
    """Pieces of a shard for every run's ranks, one after another in one flat buffer: run
    ``r`` is the view [pieces, ranks, piece_len, b, H, d] (``H``: the heads of all tensors)."""

    flat: torch.Tensor
    runs: list[torch.Tensor]

    @classmethod
    def empty(
        cls, like: torch.Tensor, pieces: int, piece_len: int, shapes: list[tuple[int, int]]
    ) -> _RunBuffer:
        """``shapes``: (ranks, heads of all tensors) of each run."""
        b, d = like.shape[0], like.shape[-1]
        sizes = [ranks * piece_len * b * heads * d for ranks, heads in shapes]
        flat = like.new_empty(pieces, sum(sizes))
        runs, start = [], 0
        for (ranks, heads), size in zip(shapes, sizes):
            # [pieces, size] -> [pieces, ranks, piece_len, b, heads, d]
            run = flat[:, start : start + size].view(pieces, ranks, piece_len, b, heads, d)
            runs.append(run)
            start += size
        return cls(flat, runs)

    def rank_pieces(self, piece: int) -> list[torch.Tensor]:
        """Piece ``piece`` for each ulysses rank, in rank order: [piece_len, b, H, d] each."""
        return [part for run in self.runs for part in run[piece].unbind(0)]


def _run_shapes(tensors: list[list[torch.Tensor]]) -> list[tuple[int, int]]:
    """(ranks, heads of all tensors) of each run, from run views [b, s, ranks, h, d] per
    tensor."""
    return [(views[0].shape[2], sum(view.shape[3] for view in views)) for views in zip(*tensors)]


def _my_run(tensors: list[list[torch.Tensor]], group: ProcessGroup) -> int:
    """The index of the run this rank belongs to."""
    if len(tensors[0]) == 1:
        return 0
    me, first = dist.get_rank(group), 0
    for index, view in enumerate(tensors[0]):
        first += view.shape[2]
        if me < first:
            return index
    raise ValueError(f"the runs cover {first} ulysses ranks; rank {me} is not among them")


def slotted_seq_to_heads_start(
    tensors: list[list[torch.Tensor]], placement: UlyssesPlacement, group: ProcessGroup
) -> PendingExchange:
    """Run views [b, s, ranks, h_i, d] of each tensor (``split_heads``) -> after ``wait()``:
    [b, U*s, h_i, d] each, with ``h_i`` the heads of this rank's run.

    The tensors are packed along heads into one send buffer (one copy per tensor and run);
    every piece is received straight into its ring-block slot of one sequence-major
    buffer, so no reordering copy runs; the results are head slices of that buffer.
    """
    degree, pieces = len(placement.slots[0]), placement.pieces
    b, s, _, _, d = tensors[0][0].shape
    piece_len = s // pieces
    send = _RunBuffer.empty(tensors[0][0], pieces, piece_len, _run_shapes(tensors))
    for run, views in zip(send.runs, zip(*tensors)):
        start = 0
        for view in views:
            ranks, h = view.shape[2:4]
            # [b, s, ranks, h, d] -> [b, pieces, piece_len, ranks, h, d]
            #   -> [pieces, ranks, piece_len, b, h, d]
            by_piece = view.view(b, pieces, piece_len, ranks, h, d).permute(1, 3, 2, 0, 4, 5)
            copy_words_(run[..., start : start + h, :], by_piece)
            start += h
    heads = [views[_my_run(tensors, group)].shape[3] for views in tensors]
    recv = tensors[0][0].new_empty(degree * s, b, sum(heads), d)  # the ring block, seq-major
    result, start = [], 0
    for h in heads:
        # [U*s, b, h, d] -> [b, U*s, h, d]
        result.append(recv[:, :, start : start + h].transpose(0, 1))
        start += h
    works = []
    for i in range(pieces):
        slots = [recv[j * piece_len : (j + 1) * piece_len] for j in placement.slots[i]]
        works += exchange_pieces(slots, send.rank_pieces(i), group)
    return PendingExchange(works, result, [send.flat])


def slotted_heads_to_seq_start(
    tensors: list[torch.Tensor],
    destinations: list[list[torch.Tensor]],
    placement: UlyssesPlacement,
    group: ProcessGroup,
) -> PendingExchange:
    """[b, U*s, h_i, d] each (ring-block order) -> after ``wait()``: copied into the run
    views [b, s, ranks, h_i, d] ``destinations`` (``split_heads``). The inverse of
    :func:`slotted_seq_to_heads_start`.

    One sequence-major tensor is sent slot by slot as it is; otherwise the tensors are
    packed along heads into a sequence-major buffer first (one copy each).
    """
    degree, pieces = len(placement.slots[0]), placement.pieces
    b, block_len, _, d = tensors[0].shape
    heads = [t.shape[2] for t in tensors]
    piece_len = block_len // (degree * pieces)
    send = tensors[0].transpose(0, 1)  # [b, U*s, h, d] -> [U*s, b, h, d]
    if len(tensors) > 1 or not send.is_contiguous():
        send = tensors[0].new_empty(block_len, b, sum(heads), d)
        start = 0
        for t, h in zip(tensors, heads):
            # [b, U*s, h, d] -> [U*s, b, h, d], into its heads of the buffer
            copy_words_(send[:, :, start : start + h], t.transpose(0, 1))
            start += h
    recv = _RunBuffer.empty(tensors[0], pieces, piece_len, _run_shapes(destinations))
    works = []
    for i in range(pieces):
        slots = [send[j * piece_len : (j + 1) * piece_len] for j in placement.slots[i]]
        works += exchange_pieces(recv.rank_pieces(i), slots, group)

    def finish() -> None:
        for run, views in zip(recv.runs, zip(*destinations)):
            start = 0
            for view in views:
                ranks, h = view.shape[2:4]
                # [pieces, ranks, piece_len, b, h, d] -> [b, pieces, piece_len, ranks, h, d]
                src = run[..., start : start + h, :].permute(3, 0, 2, 1, 4, 5)
                copy_words_(view.view(b, pieces, piece_len, ranks, h, d), src)
                start += h

    sent = send.transpose(0, 1)  # [U*s, b, h, d] -> [b, U*s, h, d]
    return PendingExchange(works, list(destinations), [send, recv.flat], finish, sent=sent)
