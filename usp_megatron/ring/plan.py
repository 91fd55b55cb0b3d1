"""What one ring pass does at each step, and its neighbour exchanges, set up once.

Every layer of a model runs the same ring pass (same groups, layout, block length, mask),
forward and backward, so the plan is built once per such key: the block tasks of every
step and the ``RingExchange`` objects (their peers resolved once). A pass uses its
exchanges one after another, never two passes at a time, so they are reused.
"""

from __future__ import annotations

import functools

from usp_megatron.call import AttentionCall
from usp_megatron.checks import Window
from usp_megatron.comm import RingExchange
from usp_megatron.groups import USPGroups
from usp_megatron.layout import SequenceLayout
from usp_megatron.mask import ALL_ROWS, BlockTask


def _covers_all_rows(tasks: tuple[BlockTask, ...]) -> bool:
    return len(tasks) == 1 and tasks[0].q_rows == ALL_ROWS and tasks[0].kv_rows == ALL_ROWS


class RingPlan:
    """The tasks of every step of one ring pass, and the exchanges it sends with.

    At step ``i`` ring rank ``r`` computes against ring block ``(r - i) % R``. ``kv`` moves
    key/value one rank on; ``grads`` moves their gradients one step behind them and
    ``grads_home`` takes them from the last step's holder to their owner (the same
    exchange as ``grads`` when that is one rank on; None where nothing moves).
    """

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
        rank, degree = groups.ring_rank, groups.ring_degree
        self.steps = layout.ring_steps(block_len, causal, window)
        self.tasks = tuple(
            layout.block_tasks(rank, (rank - step) % degree, block_len, causal, window)
            for step in range(self.steps)
        )
        #: Step 0 (the diagonal block) is one task over every row: it initialises the
        #: accumulators, and with one step it is the whole answer.
        self.diagonal_covers_all = _covers_all_rows(self.tasks[0])
        moving = self.steps > 1
        self.kv = RingExchange(groups.ring_group, 1) if moving else None
        self.grads = RingExchange(groups.ring_group, 1) if moving else None
        home = (1 - self.steps) % degree  # the last step holds block rank - (steps - 1)
        if home == 0:
            self.grads_home = None
        else:
            self.grads_home = self.grads if home == 1 else RingExchange(groups.ring_group, home)

    @staticmethod
    def of(call: AttentionCall, block_len: int) -> RingPlan:
        """The plan of ``call``'s ring pass over ring blocks of ``block_len`` rows."""
        return _plan(call.groups, call.layout, block_len, call.causal, call.window)


@functools.lru_cache(maxsize=256)
def _plan(
    groups: USPGroups, layout: SequenceLayout, block_len: int, causal: bool, window: Window | None
) -> RingPlan:
    return RingPlan(groups, layout, block_len, causal, window)
