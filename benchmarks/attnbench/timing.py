"""One timing routine for the benchmark and the profiler, and the figures around it.

CUDA events on a GPU (the host clock would time the launch, not the kernels), the host
clock on CPU; ranks meet at a barrier before the timed loop so that no rank times the
others' start-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def time_steps(
    step: Callable[[], object], warmup: int, iters: int, device: torch.device, sync_ranks: bool
) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    if sync_ranks:
        dist.barrier()
    if not cuda:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def median_ms(step: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Median of :func:`time_steps` on every rank at once (ranks synchronised)."""
    return statistics.median(time_steps(step, warmup, iters, device, True))


def world_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over all ranks: the slowest rank sets a step's time."""
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class PeakMemory:
    """GiB allocated on the GPU above what was allocated when this object was made.

    Made before a case copies its inputs, so the case's own shards, outputs, gradients and
    workspaces count and the harness's full inputs do not; ``None`` off CUDA.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def gib(self) -> float | None:
        if not self.cuda:
            return None
        return (torch.cuda.max_memory_allocated() - self.base) / 2**30
