"""Communication: the ulysses all-to-all (with autograd) and the ring's neighbour exchange.

All-to-all: ``[b, s_local, h, d]`` on each of ``U`` ranks becomes ``[b, U * s_local, h/U, d]``
(scatter heads, gather sequence) and back. Query, key and value travel in ONE all-to-all
(packed along heads), and the gathered pieces are put in ring-block position order by the
same copy that the all-to-all needs anyway (see ``layout.gather_piece_order``).

Ring: ``RingExchange.start(t)`` sends ``t`` to the next ring rank and receives the previous
rank's tensor with ``batch_isend_irecv``; ``wait()`` returns it. The caller computes in
between, so the transfer overlaps the current block.
"""

from __future__ import annotations

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


class _Layout:
    """How the gathered pieces of one all-to-all are ordered into the ring block."""

    def __init__(self, ulysses_degree: int, ring_impl: str) -> None:
        self.degree = ulysses_degree
        self.pieces = pieces_per_rank(ring_impl)
        # order[j] = gathered piece (source rank u, piece i) as u * pieces + i, for slot j.
        self.order = gather_piece_order(ulysses_degree, ring_impl)


def _seq_to_heads(
    tensors: list[torch.Tensor], group: ProcessGroup, layout: _Layout
) -> list[torch.Tensor]:
    """[b, s, h_i, d] each -> [b, U*s, h_i/U, d] each, in ring-block order, in one all-to-all."""
    u, k = layout.degree, layout.pieces
    b, s, _, d = tensors[0].shape
    heads = [t.shape[2] // u for t in tensors]
    send = torch.empty(u, b, s, sum(heads), d, dtype=tensors[0].dtype, device=tensors[0].device)
    start = 0
    for t, h in zip(tensors, heads):
        send[..., start : start + h, :].copy_(t.reshape(b, s, u, h, d).permute(2, 0, 1, 3, 4))
        start += h
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv: [U (source rank), b, s, H, d]; one cat per tensor puts the pieces in order.
    pieces = recv.view(u, b, k, s // k, sum(heads), d)
    outs, start = [], 0
    for h in heads:
        slots = [pieces[src // k, :, src % k, :, start : start + h] for src in layout.order]
        outs.append(torch.cat(slots, dim=1))
        start += h
    return outs


def _heads_to_seq(
    tensors: list[torch.Tensor], group: ProcessGroup, layout: _Layout
) -> list[torch.Tensor]:
    """Inverse of :func:`_seq_to_heads`: [b, U*s, h_i/U, d] each -> [b, s, h_i, d] each."""
    u, k = layout.degree, layout.pieces
    b, s_full, _, d = tensors[0].shape
    s = s_full // u
    heads = [t.shape[2] for t in tensors]
    send = torch.empty(u, b, s, sum(heads), d, dtype=tensors[0].dtype, device=tensors[0].device)
    send_pieces = send.view(u, b, k, s // k, sum(heads), d)
    start = 0
    for t, h in zip(tensors, heads):
        slots = t.reshape(b, u * k, s // k, h, d)
        for slot, src in enumerate(layout.order):
            send_pieces[src // k, :, src % k, :, start : start + h].copy_(slots[:, slot])
        start += h
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv: [U (head group), b, s, H, d] -> [b, s, U * h_i, d]
    outs, start = [], 0
    for h in heads:
        part = recv[..., start : start + h, :].permute(1, 2, 0, 3, 4)
        outs.append(part.reshape(b, s, u * h, d))
        start += h
    return outs


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, layout, *tensors):
        ctx.group, ctx.layout = group, layout
        return tuple(_seq_to_heads(list(tensors), group, layout))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_heads_to_seq(list(grads), ctx.group, ctx.layout))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, layout, *tensors):
        ctx.group, ctx.layout = group, layout
        return tuple(_heads_to_seq(list(tensors), group, layout))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_seq_to_heads(list(grads), ctx.group, ctx.layout))


class UlyssesAllToAll:
    """Scatter heads / gather sequence over a ulysses group, and back, with autograd."""

    def __init__(self, group: ProcessGroup, ulysses_degree: int, ring_impl: str) -> None:
        self.group = group
        self.layout = _Layout(ulysses_degree, ring_impl)

    def seq_to_heads(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each ``[b, s_local, h_i, d]`` -> ``[b, U * s_local, h_i / U, d]`` (ring-block order)."""
        return _SeqToHeads.apply(self.group, self.layout, *tensors)

    def heads_to_seq(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each ``[b, U * s_local, h_i / U, d]`` -> ``[b, s_local, h_i, d]`` (local order)."""
        return _HeadsToSeq.apply(self.group, self.layout, *tensors)
