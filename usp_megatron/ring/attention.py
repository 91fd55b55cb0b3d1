"""Ring attention: one loop for every layout, forward and backward.

At step ``i`` ring rank ``r`` holds the keys/values of ring block ``(r - i) % R``; it starts
sending them on to the next rank, computes the block tasks the layout gives for that pair
(``SequenceLayout.block_tasks``), merges by log-sum-exp, and takes the next block. The
backward runs the same loop: key/value travel as in the forward, and the key/value
gradients travel one step behind, each rank adding its contribution to the block it
holds, until the last hop delivers them to their owner.

With a sliding window the pass ends after the last step any rank computes in
(``SequenceLayout.ring_steps``): no key/value travels further, and the gradients go home
in one hop.
"""

from __future__ import annotations

import torch

from usp_megatron.comm import RingExchange
from usp_megatron.groups import USPGroups
from usp_megatron.kernels import AttentionKernel, accum_dtype
from usp_megatron.layout import SequenceLayout, Window
from usp_megatron.mask import ALL_ROWS, BlockTask
from usp_megatron.ring.merge import merge_by_lse
from usp_megatron.tensors import stack_pair


def _covers_all_rows(tasks: tuple[BlockTask, ...]) -> bool:
    return len(tasks) == 1 and tasks[0].q_rows == ALL_ROWS and tasks[0].kv_rows == ALL_ROWS


class _RingPass:
    """The tasks of every step of one ring pass, and its neighbour exchanges."""

    def __init__(
        self,
        groups: USPGroups,
        layout: SequenceLayout,
        block_len: int,
        causal: bool,
        window: Window | None,
    ) -> None:
        if layout.ring_degree != groups.ring_degree:
            raise ValueError(
                f"{layout!r} is for ring degree {layout.ring_degree}, the ring group has "
                f"{groups.ring_degree} ranks"
            )
        self.group, self.rank, self.degree = groups.ring_group, groups.ring_rank, groups.ring_degree
        self.steps = layout.ring_steps(block_len, causal, window)
        self.tasks = [
            layout.block_tasks(self.rank, (self.rank - step) % self.degree, block_len, causal,
                               window)
            for step in range(self.steps)
        ]  # fmt: skip

    def exchange(self, shift: int = 1) -> RingExchange | None:
        """An exchange ``shift`` ranks round the ring; None where nothing has to move."""
        return RingExchange(self.group, shift) if shift % self.degree else None

    def home_shift(self) -> int:
        """After the last step this rank holds block ``rank - (steps - 1)``: how far its
        gradients travel to reach their owner."""
        return (1 - self.steps) % self.degree


def ring_forward(
    groups: USPGroups,
    layout: SequenceLayout,
    kernel: AttentionKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    window: Window | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [b, s, hq, d], k/v: [b, s, hkv, d] (this rank's ring block) -> (out, lse [b, hq, s]).

    Step 0 (the diagonal block) covers every query row when it is one task: it then
    initializes the float32 accumulators (with one ring step it is the whole answer, and
    no merge runs at all).
    """
    ring = _RingPass(groups, layout, q.shape[1], causal, window)
    diagonal, acc = ring.tasks[0], accum_dtype(q.dtype)
    if ring.steps == 1 and _covers_all_rows(diagonal):
        return kernel.forward(q, k, v, diagonal[0].mask, scale)
    kv_exchange = ring.exchange() if ring.steps > 1 else None
    kv = stack_pair(k, v, k.dtype)
    if kv_exchange is not None:
        kv_exchange.start(kv)
    if _covers_all_rows(diagonal):
        out, lse = kernel.forward(q, k, v, diagonal[0].mask, scale)
        out, lse, diagonal = out.to(acc), lse.to(acc), ()
    else:
        out = q.new_zeros(q.shape, dtype=acc)
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc)
    for step in range(ring.steps):
        if step > 0:
            kv = kv_exchange.wait()
            if step + 1 < ring.steps:
                kv_exchange.start(kv)
        for task in diagonal if step == 0 else ring.tasks[step]:
            rows = task.q_rows
            block_out, block_lse = kernel.forward(
                q[:, rows], kv[0][:, task.kv_rows], kv[1][:, task.kv_rows], task.mask, scale
            )
            merge_by_lse(out[:, rows], lse[:, :, rows], block_out, block_lse)
    return out.to(q.dtype), lse


def ring_backward(
    groups: USPGroups,
    layout: SequenceLayout,
    kernel: AttentionKernel,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    window: Window | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ring_forward` given the final ``out`` and ``lse``."""
    ring = _RingPass(groups, layout, q.shape[1], causal, window)
    diagonal, acc = ring.tasks[0], accum_dtype(q.dtype)
    if ring.steps == 1 and _covers_all_rows(diagonal):
        return kernel.backward(dout, q, k, v, out, lse, diagonal[0].mask, scale)
    kv_exchange = ring.exchange() if ring.steps > 1 else None
    kv = stack_pair(k, v, k.dtype)
    if kv_exchange is not None:
        kv_exchange.start(kv)
    if _covers_all_rows(diagonal):
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, diagonal[0].mask, scale)
        dq, dkv, diagonal = dq.to(acc), stack_pair(dk, dv, acc), ()
    else:
        dq = q.new_zeros(q.shape, dtype=acc)
        dkv = kv.new_zeros(kv.shape, dtype=acc)
    dkv_next, dkv_home = ring.exchange(1), ring.exchange(ring.home_shift())
    dkv_exchange = None
    for step in range(ring.steps):
        if step > 0:
            kv = kv_exchange.wait()
            if step + 1 < ring.steps:
                kv_exchange.start(kv)
            # The gradient of the block held now, summed over the ranks that held it before.
            dkv = dkv_exchange.wait()
        for task in diagonal if step == 0 else ring.tasks[step]:
            rows, kv_rows = task.q_rows, task.kv_rows
            block_dq, block_dk, block_dv = kernel.backward(
                dout[:, rows],
                q[:, rows],
                kv[0][:, kv_rows],
                kv[1][:, kv_rows],
                out[:, rows],
                lse[:, :, rows],
                task.mask,
                scale,
            )
            dq[:, rows] += block_dq
            dkv[0][:, kv_rows] += block_dk
            dkv[1][:, kv_rows] += block_dv
        dkv_exchange = dkv_home if step + 1 == ring.steps else dkv_next
        if dkv_exchange is not None:
            dkv_exchange.start(dkv)
    if dkv_exchange is not None:
        dkv = dkv_exchange.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttentionFunction(torch.autograd.Function):
    """Ring attention alone (ulysses degree 1): the ring block is this rank's shard."""

    @staticmethod
    def forward(ctx, groups, layout, kernel, causal, scale, window, q, k, v):
        out, lse = ring_forward(groups, layout, kernel, q, k, v, causal, scale, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.groups, ctx.layout, ctx.kernel = groups, layout, kernel
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(
            ctx.groups,
            ctx.layout,
            ctx.kernel,
            dout,
            q,
            k,
            v,
            out,
            lse,
            ctx.causal,
            ctx.scale,
            ctx.window,
        )
        return None, None, None, None, None, None, dq, dk, dv


def ring_attention(
    groups: USPGroups,
    layout: SequenceLayout,
    kernel: AttentionKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    window: Window | None = None,
) -> torch.Tensor:
    """Differentiable ring attention over ``groups.ring_group``; returns [b, s, hq, d]."""
    return _RingAttentionFunction.apply(groups, layout, kernel, causal, scale, window, q, k, v)
