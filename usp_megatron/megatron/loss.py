"""The loss of a context-parallel rank weighed by the loss tokens of its whole sequence.

Without ``--calculate-per-token-loss``, megatron-core's schedule (``forward_step_calc_loss``,
0.16 to 0.19) divides each rank's summed loss by the loss tokens that rank counted (the loss
function's second result), and the gradient reduction averages over the data- and
context-parallel ranks. So every context-parallel rank's part of a sequence weighs as much
as the others', whatever its loss tokens: where the loss mask differs between the parts
(``--eod-mask-loss``, padding) the gradient differs from one rank's (Megatron's own context
parallelism does the same). :func:`balance_over_context_parallel` scales each rank's loss by
``C x n_c / N`` (``n_c`` its loss tokens, ``N`` the sum over the ``C`` ranks of its
context-parallel group), so that the schedule's division leaves ``C x loss_c / N``: averaged
over the group, the sequence's summed loss over its ``N`` tokens, as on one rank. The token
count and the reported loss stay as the loss function returned them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def balance_over_context_parallel(loss_func: Callable, cp_group: dist.ProcessGroup) -> Callable:
    """``loss_func`` (returning ``(loss, num_tokens, report)``) with the loss weighed by the
    loss tokens of the whole context-parallel group: one all-reduce of the token count per
    micro-batch. Other results (non-loss data, a 2-tuple) pass through unchanged."""

    @functools.wraps(loss_func)
    def balanced(*args: Any, **kwargs: Any) -> Any:
        outputs = loss_func(*args, **kwargs)
        if not (isinstance(outputs, tuple) and len(outputs) == 3):
            return outputs
        loss, num_tokens, report = outputs
        group_tokens = num_tokens.detach().clone()
        dist.all_reduce(group_tokens, group=cp_group)
        # The schedule divides by max(n_c, 1); the result is to be C * loss / max(N, 1).
        local, total = (t.clamp(min=1).to(torch.float64) for t in (num_tokens, group_tokens))
        scale = dist.get_world_size(cp_group) * local / total
        return loss * scale.to(loss.dtype), num_tokens, report

    return balanced
