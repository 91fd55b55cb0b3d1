"""The inputs every method runs on, one rank's shard of them, a timed step, and its error.

Every rank builds the same full inputs from one seed, so no rank needs another's data;
a method copies its own rows out (untimed), and its error is summed shard by shard at
the rows' global positions and all-reduced: nothing is gathered onto one GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Problem:
    """The full inputs ``[b, S, h, d]`` (identical on every rank) and rank 0's reference."""

    seq_len: int
    kv_heads: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    ref: dict[str, torch.Tensor]  # out, dq, dk, dv of the one-GPU run


def make_problem(
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    batch: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Problem:
    """Random q, k, v, dout from ``seed + seq_len + kv_heads``: the same on every rank."""
    gen = torch.Generator(device=device).manual_seed(seed + seq_len + kv_heads)

    def randn(h: int) -> torch.Tensor:
        shape = (batch, seq_len, h, head_dim)
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    return Problem(
        seq_len, kv_heads, randn(heads), randn(kv_heads), randn(kv_heads), randn(heads), {}
    )


@dataclass
class Shard:
    """One rank's inputs for one case, in the method's layout, and their global positions."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    positions: torch.Tensor  # global sequence positions of the local rows, in local order
    heads_first: bool  # [b, h, s, d] (PyTorch SDPA's layout) rather than [b, s, h, d]
    attend: Attend

    def bshd(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2) if self.heads_first else x


def shard_of(
    problem: Problem, positions: torch.Tensor, heads_first: bool, attend: Attend, grad: bool
) -> Shard:
    """Copy this rank's rows out of the full inputs (untimed) into the method's layout."""

    def local(full: torch.Tensor, leaf: bool) -> torch.Tensor:
        x = full.index_select(1, positions)
        x = x.transpose(1, 2).contiguous() if heads_first else x
        return x.requires_grad_(grad) if leaf else x

    q, k, v = (local(t, True) for t in (problem.q, problem.k, problem.v))
    return Shard(q, k, v, local(problem.dout, False), positions, heads_first, attend)


def make_step(shard: Shard, mode: str) -> Callable[[], torch.Tensor]:
    """One timed iteration: forward under no_grad, or forward and backward."""
    if mode == "fwd":

        def step() -> torch.Tensor:
            with torch.no_grad():
                return shard.attend(shard.q, shard.k, shard.v)
    else:

        def step() -> torch.Tensor:
            for x in (shard.q, shard.k, shard.v):
                x.grad = None
            out = shard.attend(shard.q, shard.k, shard.v)
            out.backward(shard.dout)
            return out.detach()

    return step


def sharded_rel_error(
    local: torch.Tensor, ref_full: torch.Tensor, positions: torch.Tensor
) -> float:
    """||x - ref|| / ||ref|| over the whole sequence, each rank adding its own rows."""
    ref = ref_full.index_select(1, positions).float()
    diff = local.float() - ref
    sums = torch.stack([diff.square().sum(), ref.square().sum()]).double()
    dist.all_reduce(sums)
    num, den = sums.tolist()
    return math.sqrt(num / den) if den > 0 else float("inf")
