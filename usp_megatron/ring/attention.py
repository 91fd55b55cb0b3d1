"""Ring attention: one loop for every layout, forward and backward.

Shapes in the package's letters: a ring block holds ``U*s = S / R`` tokens (a ring rank's
share after the all-to-all), of the heads this rank computes (``hq`` query, ``hkv``
key/value).

At step ``i`` ring rank ``r`` holds the keys/values of ring block ``(r - i) % R``; it starts
sending them on to the next rank, computes the block tasks the layout gives for that pair
(``RingPlan.tasks``), merges by log-sum-exp, and takes the next block. The backward runs
the same loop: key/value travel as in the forward, and the key/value gradients travel one
step behind, each rank adding its contribution to the block it holds, until the last hop
delivers them to their owner. With a sliding window the pass ends after the last step
any rank computes in: no key/value travels further, and the gradients go home in one hop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from usp_megatron.call import AttentionCall
from usp_megatron.kernels import accum_dtype
from usp_megatron.ring.merge import merge_by_lse
from usp_megatron.ring.plan import RingPlan
from usp_megatron.tensors import stack_pair


class RingInputs(NamedTuple):
    """What a ring pass's backward needs from its forward (ring-block order)."""

    q: torch.Tensor  # [b, U*s, hq, d]
    k: torch.Tensor  # [b, U*s, hkv, d]
    v: torch.Tensor  # [b, U*s, hkv, d]
    out: torch.Tensor  # [b, U*s, hq, d], the final output (any strides)
    lse: torch.Tensor  # [b, hq, U*s], float32 (float64 for float64 inputs)


def ring_forward(
    call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [b, U*s, hq, d], k/v: [b, U*s, hkv, d] (this rank's ring block) -> (out [b, U*s, hq, d],
    lse [b, hq, U*s])."""
    plan, kernel, scale = RingPlan.of(call, q.shape[1]), call.kernel, call.scale
    diagonal, acc = plan.tasks[0], accum_dtype(q.dtype)
    if plan.steps == 1 and plan.diagonal_covers_all:
        return kernel.forward(q, k, v, diagonal[0].mask, scale)
    kv = stack_pair(k, v, k.dtype)  # [2, b, U*s, hkv, d]: one message a step
    if plan.kv is not None:
        plan.kv.start(kv)
    if plan.diagonal_covers_all:
        out, lse = kernel.forward(q, k, v, diagonal[0].mask, scale)
        out, lse, diagonal = out.to(acc), lse.to(acc), ()
    else:
        out = q.new_zeros(q.shape, dtype=acc)
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc)
    for step in range(plan.steps):
        if step > 0:
            kv = plan.kv.wait()
            if step + 1 < plan.steps:
                plan.kv.start(kv)
        for task in diagonal if step == 0 else plan.tasks[step]:
            rows = task.q_rows
            block_out, block_lse = kernel.forward(
                q[:, rows], kv[0][:, task.kv_rows], kv[1][:, task.kv_rows], task.mask, scale
            )
            merge_by_lse(out[:, rows], lse[:, :, rows], block_out, block_lse)
    return out.to(q.dtype), lse


def ring_backward(
    call: AttentionCall, dout: torch.Tensor, saved: RingInputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq [b, U*s, hq, d], dk, dv [b, U*s, hkv, d]) of :func:`ring_forward`, given
    ``dout`` [b, U*s, hq, d] and what it saved."""
    q, k, v, out, lse = saved
    plan, kernel, scale = RingPlan.of(call, q.shape[1]), call.kernel, call.scale
    diagonal, acc = plan.tasks[0], accum_dtype(q.dtype)
    if plan.steps == 1 and plan.diagonal_covers_all:
        return kernel.backward(dout, q, k, v, out, lse, diagonal[0].mask, scale)
    kv = stack_pair(k, v, k.dtype)  # [2, b, U*s, hkv, d]
    if plan.kv is not None:
        plan.kv.start(kv)
    if plan.diagonal_covers_all:
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, diagonal[0].mask, scale)
        dq, dkv, diagonal = dq.to(acc), stack_pair(dk, dv, acc), ()
    else:
        dq = q.new_zeros(q.shape, dtype=acc)
        dkv = kv.new_zeros(kv.shape, dtype=acc)
    sending = None
    for step in range(plan.steps):
        if step > 0:
            kv = plan.kv.wait()
            if step + 1 < plan.steps:
                plan.kv.start(kv)
            # The gradient of the block held now, summed over the ranks that held it before.
            dkv = sending.wait()
        for task in diagonal if step == 0 else plan.tasks[step]:
            rows, kv_rows = task.q_rows, task.kv_rows
            block_dq, block_dk, block_dv = kernel.backward(
                dout[:, rows], q[:, rows], kv[0][:, kv_rows], kv[1][:, kv_rows],
                out[:, rows], lse[:, :, rows], task.mask, scale,
            )  # fmt: skip
            dq[:, rows] += block_dq
            dkv[0][:, kv_rows] += block_dk
            dkv[1][:, kv_rows] += block_dv
        sending = plan.grads_home if step + 1 == plan.steps else plan.grads
        if sending is not None:
            sending.start(dkv)
    if sending is not None:
        dkv = sending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttentionFunction(torch.autograd.Function):
    """Ring attention alone (ulysses degree 1): the ring block is this rank's shard."""

    @staticmethod
    def forward(ctx, call: AttentionCall, q, k, v):
        out, lse = ring_forward(call, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = ring_backward(ctx.call, dout, RingInputs(*ctx.saved_tensors))
        return None, dq, dk, dv


def ring_attention(
    call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Differentiable ring attention over ``call.groups.ring_group``; q: [b, U*s, hq, d],
    k/v: [b, U*s, hkv, d] -> [b, U*s, hq, d]."""
    return _RingAttentionFunction.apply(call, q, k, v)
