"""Run a function on N local processes joined in one process group.

Used by the tests, the CPU demo and the GPU checks: every rank runs ``fn(*args)``
after ``init_process_group``; the caller gets each rank's return value, or the first
failure re-raised with its rank and traceback. A rank that fails tears the others down
(they would otherwise wait forever on a collective), and a world that runs past
``timeout_s`` is killed, so nothing hangs. A rank that returns but then exits with a
nonzero code (an abort at teardown) fails the run too.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A function failed on one rank of a local world."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` processes; return the results in rank order.

    ``fn`` must be importable (a module-level function) and its results picklable.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise RankError(
                    f"{fn.__name__} did not finish on {world_size} ranks within {timeout_s}s; "
                    f"ranks done: {sorted(values)}"
                ) from None
            if not ok:
                raise RankError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            values[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    # A rank that returned can still die on its way out (an abort while the process group
    # is destroyed or the interpreter exits): that is a failure too.
    unclean = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode != 0}
    if unclean:
        raise RankError(
            f"{fn.__name__} returned on every rank, but ranks exited uncleanly (rank: exit "
            f"code) {unclean}"
        )
    return [values[r] for r in range(world_size)]
