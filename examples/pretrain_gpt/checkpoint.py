"""Plain per-rank checkpoints: every rank saves its own shard of model and optimizer state.

``<save>/iter_0000020/rank_003.pt`` plus ``<save>/latest``. Resuming needs the same world
size and parallel layout; the layout is stored and checked, so a mismatch fails clearly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

_LAYOUT_KEYS = (
    "tensor_model_parallel_size",
    "usp_ulysses_degree",
    "usp_ring_degree",
    "usp_ring_impl",
    "data_parallel_size",
)


def _layout(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in _LAYOUT_KEYS} | {"world": dist.get_world_size()}


def _rank_file(directory: str, iteration: int) -> Path:
    return Path(directory) / f"iter_{iteration:07d}" / f"rank_{dist.get_rank():03d}.pt"


def save_checkpoint(args: argparse.Namespace, iteration: int, model, optimizer, scheduler) -> None:
    path = _rank_file(args.save, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "iteration": iteration,
        "layout": _layout(args),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    torch.save(state, path)
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(args.save) / "latest").write_text(f"{iteration}\n")
        print(f"saved checkpoint of iteration {iteration} to {args.save}", flush=True)


def load_checkpoint(args: argparse.Namespace, model, optimizer, scheduler) -> int:
    """Restore the latest checkpoint in ``args.load``; returns its iteration (0 if none)."""
    latest = Path(args.load) / "latest"
    if not latest.exists():
        if dist.get_rank() == 0:
            print(f"no checkpoint in {args.load}: starting from scratch", flush=True)
        return 0
    iteration = int(latest.read_text())
    state = torch.load(_rank_file(args.load, iteration), map_location="cpu", weights_only=False)
    if state["layout"] != _layout(args):
        raise ValueError(
            f"checkpoint {args.load} was saved with layout {state['layout']}, this run has "
            f"{_layout(args)}: resume with the same parallel flags and world size"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if dist.get_rank() == 0:
        print(f"resumed from iteration {iteration} of {args.load}", flush=True)
    return iteration
