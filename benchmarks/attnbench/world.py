"""Joining the ranks torchrun started: NCCL on this rank's GPU, or gloo on CPU."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def join_world(device: str, timeout_s: float) -> torch.device:
    """``init_process_group`` for ``device`` ("cuda" or "cpu"); returns this rank's device.

    On CUDA the rank's GPU is ``LOCAL_RANK`` and is bound to the group (``device_id``), so
    NCCL sets its communicators up there and nowhere else.
    """
    timeout = timedelta(seconds=timeout_s)
    if device != "cuda":
        dist.init_process_group("gloo", timeout=timeout)
        return torch.device("cpu")
    rank_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(rank_device)
    dist.init_process_group("nccl", timeout=timeout, device_id=rank_device)
    return rank_device
