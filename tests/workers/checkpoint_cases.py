"""Resuming the GPT example's checkpoints under other parallel layouts, in one world of 4.

Every rank runs the whole story: a run of 4 iterations under U2R2 that never stops, a run
of 2 that saves, and resumes of that checkpoint under other layouts (the driver's
``initialize`` rebuilds Megatron's groups for each) that train iterations 3 and 4. Then
the same with Adam and the distributed optimizer, and the resumes that must be refused.
The test compares what comes back. Last, resumes whose learning-rate schedule differs
from the checkpoint's: refused without a flag, and the lr that runs with either of
Megatron's two flags.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch.distributed as dist
from helpers.example import example_on_path

SAVED_UNDER = ["--usp-ulysses-degree", "2", "--usp-ring-degree", "2"]
LAYOUTS = {
    "U4R1": ["--usp-ulysses-degree", "4"],
    "U1R4": ["--usp-ring-degree", "4"],
    "DP4": [],
    "TP2-DP2": ["--tensor-model-parallel-size", "2"],
    "TP2-U2": ["--tensor-model-parallel-size", "2", "--usp-ulysses-degree", "2"],
}
# Resumed with SGD and the plain optimizer, and with Adam and the distributed optimizer.
SGD_LAYOUTS = ("U4R1", "U1R4", "DP4", "TP2-U2")
DISTRIBUTED_LAYOUTS = ("TP2-DP2", "DP4")
RESUMED = [f"sgd/{name}" for name in SGD_LAYOUTS] + [f"adam/{name}" for name in DISTRIBUTED_LAYOUTS]
# SGD has momentum (0.9), so iteration 4 also checks the optimizer state; see loss_parity.py
# for why SGD and not Adam makes layouts agree to float32 rounding.
SGD = ["--optimizer", "sgd", "--lr", "0.1"]
ADAM = ["--optimizer", "adam", "--lr", "3e-3", "--use-distributed-optimizer"]
SAVED_AT, TRAIN_ITERS = 2, 4


def _driver():
    example_on_path()
    from arguments import parse_args
    from training import train

    return parse_args, train


def _metrics(history: list[dict]) -> list[tuple[int, float, float]]:
    return [(h["iteration"], h["loss"], h["grad_norm"]) for h in history]


# A resume with another decay length than the saved run's (4 iterations).
OTHER_SCHEDULE = ["--lr-decay-iters", "8"]


def _refusal(parse_args, train, argv: list[str]) -> str:
    try:
        train(parse_args(argv))
    except ValueError as error:
        return str(error)
    return "not refused"


def resume_across_layouts(directory: str) -> dict:
    """Metrics of every run (by name) and the refusal messages, on this rank."""
    parse_args, train = _driver()
    common = [
        "--device", "cpu", "--seq-length", "64", "--global-batch-size", "8",
        "--lr-warmup-iters", "1", "--lr-decay-iters", str(TRAIN_ITERS), "--log-interval", "1000",
        "--data-cache-path", f"{directory}/data",
    ]  # fmt: skip

    def run(optimizer: list[str], layout: list[str], *flags: str) -> list[tuple]:
        return _metrics(train(parse_args([*common, *optimizer, *layout, *flags])))

    out: dict = {"refused": {}}
    for name, optimizer, layouts in (
        ("sgd", SGD, SGD_LAYOUTS),
        ("adam", ADAM, DISTRIBUTED_LAYOUTS),
    ):
        ckpt = f"{directory}/{name}"
        out[f"{name}/straight"] = run(optimizer, SAVED_UNDER, "--train-iters", str(TRAIN_ITERS))
        out[f"{name}/saved"] = run(
            optimizer, SAVED_UNDER, "--train-iters", str(SAVED_AT), "--save", ckpt
        )
        for layout in layouts:
            out[f"{name}/{layout}"] = run(
                optimizer, LAYOUTS[layout], "--train-iters", str(TRAIN_ITERS), "--load", ckpt
            )
    resume = ["--train-iters", str(TRAIN_ITERS), "--load"]
    out["refused"]["model"] = _refusal(
        parse_args, train, [*common, *SGD, *resume, f"{directory}/sgd", "--hidden-size", "32"]
    )
    out["refused"]["optimizer"] = _refusal(
        parse_args, train, [*common, *ADAM[:-1], *resume, f"{directory}/adam"]
    )
    out["refused"]["sgd state"] = _refusal(
        parse_args, train, [*common, *SGD, "--use-distributed-optimizer", "--save", directory]
    )
    resume_sgd = [*common, *SGD, *SAVED_UNDER, *resume, f"{directory}/sgd", *OTHER_SCHEDULE]
    out["refused"]["schedule"] = _refusal(parse_args, train, resume_sgd)
    for flag in ("--use-checkpoint-opt_param-scheduler", "--override-opt_param-scheduler"):
        history = train(parse_args([*resume_sgd, flag]))
        out[f"lr {flag}"] = [(h["iteration"], h["lr"]) for h in history]
    out["lr straight"] = [(h["iteration"], h["lr"]) for h in train(parse_args(
        [*common, *SGD, *SAVED_UNDER, "--train-iters", str(TRAIN_ITERS)]))]  # fmt: skip
    for broken in CORRUPTIONS:
        copy = f"{directory}/broken-{broken}"
        if dist.get_rank() == 0:
            shutil.copytree(f"{directory}/sgd", copy)
            _corrupt(Path(copy), broken)
        dist.barrier()
        out["refused"][broken] = _refusal(
            parse_args, train, [*common, *SGD, *LAYOUTS["U4R1"], *resume, copy]
        )
    return out


CORRUPTIONS = ("truncated shard", "corrupted shard", "bad metadata", "bad latest")


def _corrupt(directory: Path, how: str) -> None:
    """Break a copy of a saved checkpoint as a crash or a full disk would."""
    checkpoint = directory / f"iter_{SAVED_AT:07d}"
    shard = max(checkpoint.glob("*.distcp"), key=lambda file: file.stat().st_size)
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "corrupted shard":  # the same size, every 997th byte replaced
        data, rng = bytearray(shard.read_bytes()), random.Random(0)
        for i in range(0, len(data), 997):
            data[i] = rng.randrange(256)
        shard.write_bytes(bytes(data))
    elif how == "bad metadata":
        (checkpoint / "metadata.json").write_text('{"sharded_backend": "torch_d')
    else:
        (directory / "latest").write_text("")
