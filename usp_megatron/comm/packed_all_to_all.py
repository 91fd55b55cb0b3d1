"""The ulysses all-to-all for packed documents (THD): received rank by rank, then reordered.

A rank's shard holds two chunks of every document (``PackedZigzagLayout``), whose lengths
differ from document to document, so the pieces cannot each land straight in their
ring-block slot with one collective as the dense path's do (that would take one
collective per chunk). Instead one ``all_to_all_single`` receives every source rank's
whole shard into a staging buffer, and one index copy puts its rows in ring-block order
(``UlyssesPlacement.rows``); the way back gathers by the same index before the
all-to-all. That costs one extra copy of the exchanged tensors each way. The exchange is
the dense path's (``all_to_all.exchange_pieces``: sends and receives on gloo).
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from usp_megatron.comm.all_to_all import PendingExchange, exchange_pieces
from usp_megatron.layout import UlyssesPlacement
from usp_megatron.tensors import copy_words_


def _one_run(tensors: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The single run view of each tensor: packed documents need an even head split."""
    if any(len(runs) != 1 for runs in tensors):
        raise ValueError("packed documents need the heads to split evenly over ulysses ranks")
    return [runs[0] for runs in tensors]


def staged_seq_to_heads_start(
    tensors: list[list[torch.Tensor]], placement: UlyssesPlacement, group: ProcessGroup
) -> PendingExchange:
    """One run view [b, s, U, h_i, d] of each tensor (``split_heads`` of an even split) ->
    after ``wait()``: [b, U*s, h_i, d] each, the ring block in position order (head slices
    of one sequence-major buffer)."""
    tensors = _one_run(tensors)
    degree = tensors[0].shape[2]
    b, s, _, _, d = tensors[0].shape
    heads = [t.shape[3] for t in tensors]
    total = sum(heads)
    send = tensors[0].new_empty(degree, s, b, total, d)  # [destination, s, b, h, d]
    start = 0
    for t, h in zip(tensors, heads):
        # [b, s, U, h, d] -> [U, s, b, h, d]
        copy_words_(send[..., start : start + h, :], t.permute(2, 1, 0, 3, 4))
        start += h
    staging = torch.empty_like(send)  # [source rank, s, b, h, d]
    works = exchange_pieces(list(staging.unbind(0)), list(send.unbind(0)), group)
    block = send.new_empty(degree * s, b, total, d)  # the ring block, seq-major
    rows = placement.rows_on(send.device)
    result, start = [], 0
    for h in heads:
        # [U*s, b, h, d] -> [b, U*s, h, d]
        result.append(block[:, :, start : start + h].transpose(0, 1))
        start += h

    def finish() -> None:
        # [U, s, b, h, d] -> [U*s, b, h, d], row u*s + t to its ring-block row
        block.index_copy_(0, rows, staging.view(degree * s, b, total, d))

    return PendingExchange(works, result, [send, staging], finish)


def staged_heads_to_seq_start(
    tensors: list[torch.Tensor],
    destinations: list[list[torch.Tensor]],
    placement: UlyssesPlacement,
    group: ProcessGroup,
) -> PendingExchange:
    """[b, U*s, h_i, d] each (ring-block order) -> after ``wait()``: copied into the run
    views [b, s, U, h_i, d] ``destinations``. The inverse of
    :func:`staged_seq_to_heads_start`."""
    destinations = _one_run(destinations)
    degree = destinations[0].shape[2]
    b, block_len, _, d = tensors[0].shape
    s = block_len // degree
    heads = [t.shape[2] for t in tensors]
    total = sum(heads)
    rows = placement.rows_on(tensors[0].device)
    send = tensors[0].new_empty(block_len, b, total, d)  # [U*s (destination-major), b, h, d]
    start = 0
    for t, h in zip(tensors, heads):
        # [b, U*s, h, d] -> [U*s, b, h, d], ring-block row rows[u*s + t] to row u*s + t
        copy_words_(send[:, :, start : start + h], t.transpose(0, 1).index_select(0, rows))
        start += h
    recv = send.new_empty(degree, s, b, total, d)  # [source rank, s, b, h, d]
    by_destination = send.view(degree, s, b, total, d)  # [U*s, ...] -> [U, s, b, h, d]
    works = exchange_pieces(list(recv.unbind(0)), list(by_destination.unbind(0)), group)

    def finish() -> None:
        start = 0
        for dest, h in zip(destinations, heads):
            # [U, s, b, h, d] -> [b, s, U, h, d]
            copy_words_(dest, recv[..., start : start + h, :].permute(2, 1, 0, 3, 4))
            start += h

    return PendingExchange(works, list(destinations), [send, recv], finish)
