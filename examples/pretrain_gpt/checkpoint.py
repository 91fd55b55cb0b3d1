"""Distributed checkpoints through megatron-core's ``dist_checkpointing`` (torch_dist format).

``<save>/iter_0000020/`` holds every tensor once, with its place in the global tensor, and
``<save>/latest`` names the newest. So a checkpoint written under one ``(TP, U, R, DP)``
layout resumes under any other, on any number of ranks: USP shards no parameters,
tensor-parallel shards are cut anew on load, and the distributed optimizer's state is saved
in megatron-core's fully reshardable form. The model, the optimizer and the sample order
must stay (``_RUN_KEYS``, checked before any tensor is read); the random streams resume
exactly under the same layout only.

``--load`` follows Megatron-LM: a directory without ``latest`` starts from scratch (the
first run of a ``--save`` and ``--load`` pair); a directory that does not exist is refused
(a mistyped path would silently train from scratch). A checkpoint whose files are broken
is refused in one message that names the file (:func:`read_checkpoint`, run before
anything is built, and around the load for what only reading every byte finds).
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

# The layout of a run: free to change on resume, but random streams follow it (see _rng).
_LAYOUT_KEYS = (
    "tensor_model_parallel_size",
    "usp_ulysses_degree",
    "usp_ring_degree",
    "usp_ring_impl",
    "data_parallel_size",
)
# What makes the resumed run the same run: the model's shapes and numerics, the optimizer
# (its state's keys) and the sample order (global batch i is samples [i*G, (i+1)*G) of the
# dataset shuffled with --seed). Keys a checkpoint lacks (older versions) are not compared.
_RUN_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "normalization",
    "position_embedding_type",
    "seq_length",
    "vocab_size",
    "bf16",
    "optimizer",
    "use_distributed_optimizer",
    "global_batch_size",
    "seed",
)


class CheckpointError(ValueError):
    """A ``--load`` the driver refuses; the message names the file and what to do."""


def _latest_iteration(directory: str) -> int | None:
    """The iteration ``<directory>/latest`` names; None when there is no ``latest``."""
    if not Path(directory).is_dir():
        raise CheckpointError(
            f"--load {directory}: no such directory; to start from scratch, drop --load (a "
            "directory without a checkpoint yet is fine: training then starts from scratch)"
        )
    latest = Path(directory) / "latest"
    if not latest.exists():
        return None
    text = latest.read_text(errors="replace").strip()
    if not text.isdigit():
        raise CheckpointError(
            f"checkpoint tracker {latest} is broken: it holds {text[:40]!r}, not an iteration "
            f"number; write the iteration of a complete iter_* directory of {directory} into "
            "it, or drop --load to start from scratch"
        )
    return int(text)


def _broken_file(path: Path) -> str | None:
    """What is wrong with the files of checkpoint ``path``, naming the file; None if their
    metadata reads and every shard file holds the bytes the metadata places in it."""
    megatron_metadata = path / "metadata.json"
    if not megatron_metadata.is_file():
        return (
            f"{megatron_metadata} is missing: {path} holds no distributed checkpoint (the "
            "per-rank files of this driver's earlier versions are not read)"
        )
    try:
        json.loads(megatron_metadata.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{megatron_metadata} is not valid JSON ({error})"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        return f"{path / '.metadata'} is unreadable ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"{shard} is missing"
        size = shard.stat().st_size
        if size < end:
            return f"{shard} is truncated: {size} bytes, the checkpoint's metadata needs {end}"
    return None


def _unreadable_item(path: Path) -> str | None:
    """The first item of checkpoint ``path`` whose bytes do not load, with its file and
    offset: what a load that failed on corrupted bytes does not say (it reports every
    rank's traceback instead). Reads the whole checkpoint: only for a load that failed.
    Bytes that are corrupted but still parse are not found (no checksums are saved)."""
    metadata = FileSystemReader(str(path)).read_metadata()
    items = sorted(metadata.storage_data.items(), key=lambda i: (i[1].relative_path, i[1].offset))
    for index, info in items:
        with open(path / info.relative_path, "rb") as file:
            file.seek(info.offset)
            blob = io.BytesIO(file.read(info.length))
        tensor = isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata)
        try:  # as torch's reader does: tensors weights-only; objects (this run's own) pickled
            torch.load(blob, map_location="cpu", weights_only=tensor)
        except Exception as error:  # noqa: BLE001 - any failure is the answer
            reason = _first_line(error).split(". ")[0].rstrip(".")
            return (
                f"{path / info.relative_path} holds unreadable bytes at offset {info.offset} "
                f"({index.fqn}: {reason})"
            )
    return None


def _refuse_broken(directory: str, path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is broken: {problem}. Resume from another checkpoint (write its "
        f"iteration into {Path(directory) / 'latest'}), or drop --load to start from scratch"
    )


def read_checkpoint(directory: str) -> tuple[int, Path, dict] | None:
    """The latest checkpoint of a ``--load`` directory: its iteration, its path and its
    common state (iteration, layout, the run's flags, the scheduler), read without a
    process group; None when the directory holds no checkpoint yet. Refuses with
    :class:`CheckpointError` a missing directory, a broken ``latest`` and a checkpoint
    whose files are missing, truncated or unreadable."""
    iteration = _latest_iteration(directory)
    if iteration is None:
        return None
    path = _iteration_dir(directory, iteration)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint tracker {Path(directory) / 'latest'} names iteration {iteration}, but "
            f"{path} does not exist; write the iteration of a complete iter_* directory into "
            "it, or drop --load to start from scratch"
        )
    problem = _broken_file(path)
    if problem is not None:
        raise _refuse_broken(directory, path, problem)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as error:  # noqa: BLE001 - any unreadable file: one message, not 150 lines
        problem = f"reading {path / 'common.pt'} failed with {_first_line(error)}"
        raise _refuse_broken(directory, path, problem) from None
    return iteration, path, common


def _layout(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in _LAYOUT_KEYS} | {"world": dist.get_world_size()}


def _describe(layout: dict) -> str:
    return (
        f"TP{layout['tensor_model_parallel_size']} x U{layout['usp_ulysses_degree']}"
        f"R{layout['usp_ring_degree']} ({layout['usp_ring_impl']}) x "
        f"DP{layout['data_parallel_size']} on {layout['world']} ranks"
    )


def _run(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in _RUN_KEYS}


def _metadata(args: argparse.Namespace) -> dict:
    """How megatron-core builds the sharded state dicts; stored with the checkpoint.

    ``fully_reshardable`` saves the distributed optimizer's state as whole tensors, so it
    loads under any layout (its default cuts it by data-parallel rank).
    """
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    return metadata


def _rng(args: argparse.Namespace) -> ShardedObject:
    """This rank's random streams (torch, the device's, Megatron's model-parallel tracker).

    Kept per rank: they resume exactly under the same layout. Under another one, each rank
    draws for other tokens and shards anyway (dropout), so they restart from ``--seed``.
    """
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and args.device != "cpu":
        state["cuda"] = torch.cuda.get_rng_state()
    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _create_state(torch_optimizer: torch.optim.Optimizer, config: object = None) -> None:
    """Create the state that torch's SGD and Adam make on their first step, as zeros.

    A load needs somewhere to put the saved state. megatron-core creates it for Adam only
    (``init_state_fn``; none for SGD, where loading then fails), and on CPU, without Apex
    or TransformerEngine, the distributed optimizer asks torch's Adam for its step before
    that.
    """
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            state = torch_optimizer.state[param]
            if state:
                continue
            if isinstance(torch_optimizer, torch.optim.Adam):
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            elif group.get("momentum"):
                state["momentum_buffer"] = torch.zeros_like(param)


def _prepare_for_load(optimizer) -> None:
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if inner.init_state_fn is None:
            inner.init_state_fn = _create_state
        _create_state(inner.optimizer)


def _load_optimizer(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, with torch's Adam under the distributed optimizer fixed.

    megatron-core's fully reshardable loader copies every per-parameter state tensor of
    the inner optimizer from the checkpoint; torch's Adam (no Apex or TransformerEngine,
    e.g. on CPU) keeps its step count among them, which the checkpoint holds in the
    parameter groups instead. The step is set aside while the tensors load, and put back
    as one tensor per parameter: megatron-core gives them all the same tensor, which
    torch's Adam would then advance once per parameter on every step.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(inners) != 1 or state.get("param_state_sharding_type") != "fully_reshardable":
        optimizer.load_state_dict(state)
        return
    inner = inners[0]
    inner.load_state_dict({key: value for key, value in state.items() if key != "param_state"})
    torch_state = inner.optimizer.state  # a new dict after loading
    steps = {param: entry.pop("step") for param, entry in torch_state.items() if "step" in entry}
    inner.load_parameter_state_from_fully_reshardable(state["param_state"])
    for param, step in steps.items():
        torch_state[param]["step"] = step.clone()


def _sharded_state(model, optimizer, metadata: dict, loading: bool) -> dict:
    metadata = metadata | {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    model_state = unwrap_model(model).sharded_state_dict(metadata=metadata)
    optimizer_state = optimizer.sharded_state_dict(
        model_state, is_loading=loading, metadata=metadata
    )
    return {"model": model_state, "optimizer": optimizer_state}


def _iteration_dir(directory: str, iteration: int) -> Path:
    return Path(directory) / f"iter_{iteration:07d}"


def save_checkpoint(args: argparse.Namespace, iteration: int, model, optimizer, scheduler) -> None:
    """Write ``<save>/iter_<iteration>`` from every rank, then point ``latest`` at it."""
    path = _iteration_dir(args.save, iteration)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    metadata = _metadata(args)
    state = _sharded_state(model, optimizer, metadata, loading=False)
    state |= {
        "iteration": iteration,
        "layout": _layout(args),
        "run": _run(args),
        "scheduler": scheduler.state_dict(),
        "rng_state": _rng(args),
    }
    dist_checkpointing.save(state, str(path), content_metadata=metadata)
    if dist.get_rank() == 0:
        (Path(args.save) / "latest").write_text(f"{iteration}\n")
        print(f"saved checkpoint of iteration {iteration} to {args.save}", flush=True)
    dist.barrier()


def check_same_run(args: argparse.Namespace, path: Path, saved: dict) -> None:
    """Refuse a resume that changes the model, the optimizer or the sample order."""
    for key, value in _run(args).items():
        if key in saved and saved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"checkpoint {path} was saved with {flag} {saved.get(key)}, this run has "
                f"{value}: resume with {flag} {saved.get(key)} (what may change is the "
                f"parallel layout: TP, --usp-* degrees and impl, data-parallel and world size)"
            )


def _first_line(error: BaseException) -> str:
    """A failed read as one line: the exception's type and its first line (for torch's
    CheckpointException, which holds every rank's traceback, the first rank's error)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:300]}"


def load_checkpoint(args: argparse.Namespace, model, optimizer, scheduler) -> int:
    """Restore the latest checkpoint in ``args.load`` under this run's layout.

    Returns its iteration (0 if there is none).
    """
    saved = read_checkpoint(args.load)  # the run's flags were checked in preflight.py
    if saved is None:
        if dist.get_rank() == 0:
            print(f"no checkpoint in {args.load}: starting from scratch", flush=True)
        return 0
    iteration, path, common = saved
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    _prepare_for_load(optimizer)
    state = _sharded_state(model, optimizer, metadata, loading=True)
    same_layout = common["layout"] == _layout(args)
    if same_layout:
        state["rng_state"] = _rng(args)
    try:
        state = dist_checkpointing.load(state, str(path))
    # torch's CheckpointException is a BaseException: it carries every rank's traceback.
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - e.g. corrupt bytes
        problem = _broken_file(path) or _unreadable_item(path)
        problem = problem or f"reading {path} failed with {_first_line(error)}"
        raise _refuse_broken(args.load, path, problem) from None
    unwrap_model(model).load_state_dict(state["model"])
    _load_optimizer(optimizer, state["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng(state["rng_state"])
    if dist.get_rank() == 0:
        moved = ""
        if not same_layout:
            moved = (
                f", saved under {_describe(common['layout'])}, now {_describe(_layout(args))}"
                f" (random streams restart from --seed)"
            )
        print(f"resumed from iteration {iteration} of {args.load}{moved}", flush=True)
    return iteration
