"""The ring's neighbour exchange: send to the next ring rank, receive from the previous.

``start(t)`` posts both with ``batch_isend_irecv``; ``wait()`` returns what arrived. The
caller computes in between, so the transfer overlaps the current block. ``shift`` sends
further round the ring (a pass that ends early sends gradients home in one hop).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class RingExchange:
    """Send to the rank ``shift`` ahead in the ring and receive from the one ``shift`` behind."""

    def __init__(self, group: ProcessGroup, shift: int = 1) -> None:
        self.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (rank + shift) % size)
        self.prev_rank = dist.get_global_rank(group, (rank - shift) % size)
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
