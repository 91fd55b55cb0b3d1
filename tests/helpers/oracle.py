"""The exact references the tests compare with: one-rank float64 attention with autograd
(dense and packed documents), and Megatron's THD split from its definition."""

from __future__ import annotations

import torch


def attention_float64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """q: [b, s, hq, d], k/v: [b, s, hkv, d] -> [b, s, hq, d], all in float64.

    ``window=(left, right)``: query ``i`` sees keys ``i-left .. i+right`` (-1 unbounded)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    sq, sk = scores.shape[-2:]
    offset = torch.arange(sk, device=q.device) - torch.arange(sq, device=q.device)[:, None]
    hidden = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        hidden |= offset > 0
    if window is not None:
        left, right = window
        if left >= 0:
            hidden |= offset < -left
        if right >= 0:
            hidden |= offset > right
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf if anything is not finite."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def document_attention_float64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: list[int],
    cu_seqlens_padded: list[int],
    causal: bool,
) -> torch.Tensor:
    """Packed documents: q [1, S, hq, d], k/v [1, S, hkv, d] over the padded sequence -> the
    float64 output, a token seeing only real tokens of its own document (earlier-or-equal
    ones with ``causal``), padding rows 0. Written from the definition, not the layout."""
    seq_len = q.shape[1]
    document = torch.full((seq_len,), -1)
    for n, (start, real) in enumerate(
        zip(cu_seqlens_padded, (b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])))
    ):
        document[start : start + real] = n
    real_token = document >= 0
    seen = (document[:, None] == document[None, :]) & real_token[:, None]
    if causal:
        seen &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    seen |= ~real_token[:, None]  # padding rows: any finite softmax, zeroed below
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~seen.to(q.device), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return out * real_token.to(q.device).double()[None, :, None, None]


def thd_partitioned_indices(cu_seqlens_padded, cp_size, cp_rank):
    """Megatron's THD split, from its definition (TransformerEngine's
    ``thd_get_partitioned_indices``): each document in 2 * cp_size chunks, this rank's
    chunks cp_rank and 2 * cp_size - 1 - cp_rank, documents in order."""
    indices = []
    for start, stop in zip(cu_seqlens_padded, cu_seqlens_padded[1:]):
        chunk = (stop - start) // (2 * cp_size)
        for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
            indices += range(start + index * chunk, start + (index + 1) * chunk)
    return torch.tensor(indices, dtype=torch.int64)
