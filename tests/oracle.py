"""One-rank float64 attention with autograd: the exact reference every test compares with."""

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
