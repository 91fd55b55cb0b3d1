"""Ring attention: one loop for every ring impl, forward and backward.

At step ``i`` ring rank ``r`` holds the keys/values of block ``(r - i) % R``; it starts sending
them on to the next rank, computes its block (``schedule.block_task``), merges by
log-sum-exp, and takes the next block. The backward runs the same loop: key/value travel
as in the forward, and the key/value gradients travel one step behind, each rank adding
its contribution to the block it holds, until the last hop delivers them to their owner.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from usp_megatron.comm import RingExchange, copy_words_
from usp_megatron.kernels import AttentionKernel
from usp_megatron.kernels.base import accum_dtype
from usp_megatron.ring.merge import merge_by_lse
from usp_megatron.ring.schedule import block_task


def _pair(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch.stack([a, b]).to(dtype)``: one stack kernel for dense inputs of that dtype;
    else one pass per tensor (8-byte words where the dtype stays), since the inputs are
    then head slices of the all-to-all's packed buffer, which a stack reads element by
    element (4 x H100, 32K U2R2: forward 2.5% faster; U1R4's dense inputs 2% slower, hence
    the stack for them)."""
    if dtype == a.dtype and a.is_contiguous() and b.is_contiguous():
        return torch.stack([a, b])
    pair = a.new_empty((2, *a.shape), dtype=dtype)
    for dst, src in zip(pair, (a, b)):
        copy_words_(dst, src)
    return pair


class RingContext:
    """A ring group and what every step needs from it."""

    def __init__(self, group: ProcessGroup | None, ring_rank: int, ring_degree: int, impl: str):
        self.group, self.rank, self.size, self.impl = group, ring_rank, ring_degree, impl

    def exchange(self) -> RingExchange | None:
        return RingExchange(self.group) if self.size > 1 else None


def ring_forward(
    ring: RingContext,
    kernel: AttentionKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [b, s, hq, d], k/v: [b, s, hkv, d] (this rank's ring block) -> (out, lse [b, hq, s]).

    Step 0 is the diagonal block, which covers every query row: it initializes the float32
    accumulators (with one ring rank it is the whole answer, and no merge runs at all).
    """
    if ring.size == 1:
        return kernel.forward(q, k, v, causal, scale)
    s = q.shape[1]
    kv_exchange = ring.exchange()
    kv = _pair(k, v, k.dtype)
    kv_exchange.start(kv)
    out, lse = kernel.forward(q, k, v, causal, scale)
    out, lse = out.to(accum_dtype(q.dtype)), lse.to(accum_dtype(q.dtype))
    for step in range(1, ring.size):
        kv = kv_exchange.wait()
        if step + 1 < ring.size:
            kv_exchange.start(kv)
        task = block_task(ring.impl, causal, ring.rank, (ring.rank - step) % ring.size, s)
        if task is not None:
            block_out, block_lse = kernel.forward(
                q[:, task.q_rows], kv[0][:, task.kv_rows], kv[1][:, task.kv_rows],
                task.causal, scale,
            )
            merge_by_lse(out[:, task.q_rows], lse[:, :, task.q_rows], block_out, block_lse)
    return out.to(q.dtype), lse


def ring_backward(
    ring: RingContext,
    kernel: AttentionKernel,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ring_forward` given the final ``out`` and ``lse``."""
    if ring.size == 1:
        return kernel.backward(dout, q, k, v, out, lse, causal, scale)
    s, acc = q.shape[1], accum_dtype(q.dtype)
    kv_exchange, dkv_exchange = ring.exchange(), ring.exchange()
    kv = _pair(k, v, k.dtype)
    kv_exchange.start(kv)
    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal, scale)
    dq = dq.to(acc)
    dkv_exchange.start(_pair(dk, dv, acc))
    for step in range(1, ring.size):
        kv = kv_exchange.wait()
        if step + 1 < ring.size:
            kv_exchange.start(kv)
        task = block_task(ring.impl, causal, ring.rank, (ring.rank - step) % ring.size, s)
        if task is not None:
            rows = task.q_rows
            block_dq, block_dk, block_dv = kernel.backward(
                dout[:, rows], q[:, rows], kv[0][:, task.kv_rows], kv[1][:, task.kv_rows],
                out[:, rows], lse[:, :, rows], task.causal, scale,
            )
            dq[:, rows] += block_dq
        # The gradient of the block held now, summed over the ranks that held it before.
        dkv = dkv_exchange.wait()
        if task is not None:
            dkv[0][:, task.kv_rows] += block_dk
            dkv[1][:, task.kv_rows] += block_dv
        dkv_exchange.start(dkv)
    dkv = dkv_exchange.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ring, kernel, causal, scale, q, k, v):
        out, lse = ring_forward(ring, kernel, q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.kernel, ctx.causal, ctx.scale = ring, kernel, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(
            ctx.ring, ctx.kernel, dout, q, k, v, out, lse, ctx.causal, ctx.scale
        )
        return None, None, None, None, dq, dk, dv


def ring_attention(
    ring: RingContext,
    kernel: AttentionKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Differentiable ring attention over ``ring``'s group; returns [b, s, hq, d]."""
    return _RingAttentionFunction.apply(ring, kernel, causal, scale, q, k, v)
