"""Communication: the ulysses all-to-all (with autograd) and the ring's neighbour exchange.

All-to-all: ``[b, s_local, h, d]`` on each of ``U`` ranks becomes ``[b, U * s_local, h/U, d]``
(scatter heads, gather sequence) and back. Query, key and value travel in ONE all-to-all
(packed along heads), and the gathered pieces are put in ring-block position order by the
same copy that the all-to-all needs anyway (see ``layout.gather_piece_order``). The pack /
unpack halves are separate so that the caller can overlap chunks of heads with compute.

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


class GatherLayout:
    """How the gathered pieces of one all-to-all are ordered into the ring block."""

    def __init__(self, ulysses_degree: int, ring_impl: str) -> None:
        self.degree = ulysses_degree
        self.pieces = pieces_per_rank(ring_impl)
        # order[j] = gathered piece (source rank u, piece i) as u * pieces + i, for slot j.
        self.order = gather_piece_order(ulysses_degree, ring_impl)


def split_heads(x: torch.Tensor, ulysses_degree: int, chunks: int) -> list[torch.Tensor]:
    """[b, s, h, d] -> ``chunks`` views [b, s, U, h/(U*chunks), d]: what each all-to-all sends.

    Chunk ``c`` holds, for every destination rank ``u``, the ``c``-th part of the heads that
    rank ``u`` owns after the all-to-all, so each chunk is an independent all-to-all.
    """
    b, s, h, d = x.shape
    parts = x.reshape(b, s, ulysses_degree, chunks, h // (ulysses_degree * chunks), d)
    return [parts[:, :, :, c] for c in range(chunks)]


def pack_seq_to_heads(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Views [b, s, U, h_i, d] -> one send buffer [U, b, s, sum h_i, d]."""
    b, s, u, _, d = tensors[0].shape
    heads = [t.shape[3] for t in tensors]
    send = torch.empty(u, b, s, sum(heads), d, dtype=tensors[0].dtype, device=tensors[0].device)
    start = 0
    for t, h in zip(tensors, heads):
        send[..., start : start + h, :].copy_(t.permute(2, 0, 1, 3, 4))
        start += h
    return send


def unpack_seq_to_heads(
    recv: torch.Tensor, heads: list[int], layout: GatherLayout
) -> list[torch.Tensor]:
    """Received [U (source rank), b, s, H, d] -> [b, U*s, h_i, d] each, in ring-block order."""
    u, b, s, total, d = recv.shape
    k = layout.pieces
    pieces = recv.view(u, b, k, s // k, total, d)
    outs, start = [], 0
    for h in heads:
        slots = [pieces[src // k, :, src % k, :, start : start + h] for src in layout.order]
        outs.append(torch.cat(slots, dim=1))
        start += h
    return outs


def pack_heads_to_seq(tensors: list[torch.Tensor], layout: GatherLayout) -> torch.Tensor:
    """[b, U*s, h_i, d] each (ring-block order) -> one send buffer [U, b, s, sum h_i, d]."""
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
    return send


def unpack_heads_to_seq(recv: torch.Tensor, destinations: list[torch.Tensor]) -> None:
    """Received [U (head group), b, s, H, d] -> copied into views [b, s, U, h_i, d]."""
    start = 0
    for dest in destinations:
        h = dest.shape[3]
        dest.copy_(recv[..., start : start + h, :].permute(1, 2, 0, 3, 4))
        start += h


def all_to_all_start(send: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, object]:
    """Start an all-to-all over dim 0 of ``send``; returns (receive buffer, work to wait on)."""
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return recv, work
