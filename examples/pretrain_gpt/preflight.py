"""Check the whole configuration before anything is built, and refuse it in one message.

A bad flag used to surface 13-19 s in, after model, data and optimizer were built, as one
traceback per rank (and some only as Megatron's own shape errors). Here every rank runs
the same checks on the same flags and files before the process group exists, so all
ranks agree without talking: :class:`ConfigError` carries the one message, which
``pretrain_gpt.py`` prints on rank 0 before every rank exits 1.

:func:`check_configuration` also returns the :class:`Plan` the checks worked out (data
parallel size, device, kernel and why, the data's size) for the start-up banner.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from checkpoint import CheckpointError, check_checkpoint
from corpus import ByteTokenizer, default_documents
from data import tokenizer_for
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from usp_megatron.kernels import available_backends, get_kernel
from usp_megatron.kernels.flash_attn import flash_attn_importable
from usp_megatron.megatron import apply_usp_args, validate_usp_args
from usp_megatron.megatron.arguments import usp_enabled, usp_layout
from usp_megatron.megatron.validation import check_heads, check_packed_documents

# Token ids are checked against the vocabulary over at most this many tokens of a dataset
# (a full scan of a large corpus would cost minutes on every rank before training).
MAX_TOKENS_SCANNED = 1 << 24


class ConfigError(ValueError):
    """A configuration the driver refuses; the message names the value and the fix."""


@dataclass(frozen=True)
class DataFacts:
    """What the training data is, as the banner reports it."""

    description: str
    prefix: str
    documents: int
    tokens: int
    vocab_size: int


@dataclass(frozen=True)
class Plan:
    """What the checks worked out, derived once here for the banner and the log lines."""

    world_size: int
    data_parallel_size: int
    device: torch.device
    dtype: torch.dtype
    kernel: str
    kernel_reason: str
    data: DataFacts


def use_cuda(args: argparse.Namespace) -> bool:
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def check_configuration(
    args: argparse.Namespace, world_size: int, local_world_size: int | None = None
) -> Plan:
    """Refuse with :class:`ConfigError` what cannot run; set ``context_parallel_size``,
    ``hierarchical_context_parallel_sizes`` and ``data_parallel_size`` on ``args``.

    Touches no process group and no accelerator memory: it runs before both exist.
    """
    if local_world_size is None:  # torchrun's processes on this node, else one node
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = _check_device(args, local_world_size)
    _check_context_parallel(args)
    args.data_parallel_size = _check_world(args, world_size)
    _check_heads(args)
    _check_seq_length(args)
    _check_packed_documents(args)
    try:
        validate_usp_args(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_schedule(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kernel, reason = attention_kernel(args, device, dtype)
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            f"--tensorboard-dir {args.tensorboard_dir} needs the tensorboard package: "
            "pip install 'usp_megatron[tensorboard]' (or pip install tensorboard), or drop "
            "--tensorboard-dir"
        )
    return Plan(
        world_size=world_size,
        data_parallel_size=args.data_parallel_size,
        device=device,
        dtype=dtype,
        kernel=kernel,
        kernel_reason=reason,
        data=check_data(args),
    )


def _check_device(args: argparse.Namespace, local_world_size: int) -> torch.device:
    if not use_cuda(args):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"--device cuda, but this machine has no usable CUDA device (torch "
            f"{torch.__version__}, {build}): use --device cpu (gloo processes) or --device auto"
        )
    gpus = torch.cuda.device_count()
    if local_world_size > gpus:
        raise ConfigError(
            f"{local_world_size} processes on this node but only {gpus} CUDA devices: "
            f"launch torchrun --nproc-per-node {gpus} (one process per GPU)"
        )
    return torch.device("cuda")


def _check_context_parallel(args: argparse.Namespace) -> None:
    try:
        apply_usp_args(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    cp = args.context_parallel_size
    if cp < 1:
        raise ConfigError(f"--context-parallel-size must be at least 1, got {cp}")
    if cp > 1 and not usp_enabled(args):
        examples = _degree_examples(args, cp)
        raise ConfigError(
            f"--context-parallel-size {cp}: this driver's context parallelism is USP, set by "
            f"its degrees: give --usp-ulysses-degree U --usp-ring-degree R with U x R = {cp}"
            + (f" (here: {examples})" if examples else "")
            + ", and drop --context-parallel-size (it becomes U x R)"
        )
    if args.megatron_attention and cp > 1:
        raise ConfigError(
            f"--megatron-attention runs Megatron's DotProductAttention, which has no context "
            f"parallelism; drop it or the --usp-* degrees (context-parallel size {cp})"
        )


def _degree_examples(args: argparse.Namespace, cp: int) -> str:
    """The ``U x R`` splits of ``cp`` the heads allow, as flags."""
    flags = []
    for u in sorted((d for d in range(1, cp + 1) if cp % d == 0), reverse=True):
        try:
            check_heads(args.num_attention_heads, args.tensor_model_parallel_size, u)
        except ValueError:
            continue
        flags.append(f"--usp-ulysses-degree {u} --usp-ring-degree {cp // u}")
    return " or ".join(flags[:3])


def _check_world(args: argparse.Namespace, world_size: int) -> int:
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    for flag, value in (
        ("--tensor-model-parallel-size", tp),
        ("--micro-batch-size", args.micro_batch_size),
        ("--global-batch-size", args.global_batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if world_size % (tp * cp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of TP {tp} x CP {cp} = {tp * cp}: "
            f"launch a multiple of {tp * cp} processes or change the degrees"
        )
    dp = world_size // (tp * cp)
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp} = {per_step}"
        )
    return dp


def _check_heads(args: argparse.Namespace) -> None:
    """What TransformerConfig would refuse later, or Megatron's reshape would trip over."""
    heads, groups = args.num_attention_heads, args.num_query_groups
    tp = args.tensor_model_parallel_size
    if args.hidden_size < heads:
        raise ConfigError(
            f"--hidden-size {args.hidden_size} is smaller than --num-attention-heads {heads}: "
            "the head dimension (hidden / heads) would be 0"
        )
    if heads % tp:
        raise ConfigError(
            f"--num-attention-heads {heads} must be divisible by --tensor-model-parallel-size "
            f"{tp}: tensor parallelism splits the heads"
        )
    if groups < 1 or heads % groups:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ConfigError(
            f"--num-query-groups {groups} must divide --num-attention-heads {heads} (every "
            f"key/value head serves the same number of query heads): choose one of {divisors}"
        )
    if groups % tp:
        raise ConfigError(
            f"--num-query-groups {groups} must be divisible by --tensor-model-parallel-size "
            f"{tp}: tensor parallelism splits the key/value heads too"
        )
    if usp_enabled(args):
        try:
            check_heads(heads, tp, args.usp_ulysses_degree)
        except ValueError as error:
            raise ConfigError(f"--usp-ulysses-degree: {error}") from None


def _check_seq_length(args: argparse.Namespace) -> None:
    if not usp_enabled(args):
        return
    layout = usp_layout(args)
    try:
        layout.check_seq_len(args.seq_length)
    except ValueError as error:
        multiple = layout.sequence_multiple
        below = max(multiple, args.seq_length // multiple * multiple)
        above = below + multiple
        raise ConfigError(f"--seq-length: {error}; e.g. --seq-length {below} or {above}") from None


def _check_packed_documents(args: argparse.Namespace) -> None:
    """What USP attention refuses for packed documents (THD), which would otherwise come
    from the first forward, after the model is built, once per rank."""
    if not args.pack_documents:
        return
    cp = args.context_parallel_size
    heads = args.num_attention_heads // args.tensor_model_parallel_size
    u = args.usp_ulysses_degree if usp_enabled(args) else 1
    try:
        what = "--reset-attention-mask" if args.reset_attention_mask else "--pack-documents"
        check_packed_documents(usp_layout(args), args.window_size, heads, u, what)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    multiple = args.pack_pad_multiple
    if multiple is not None and (multiple < 1 or multiple % (2 * cp)):
        raise ConfigError(
            f"--pack-pad-multiple {multiple}: the context-parallel split cuts every packed "
            f"document into 2 x context-parallel size = {2 * cp} equal chunks, so the padding "
            f"multiple must be a positive multiple of {2 * cp}: use --pack-pad-multiple "
            f"{2 * cp * max(1, -(-multiple // (2 * cp)))}, or leave it out (default {2 * cp})"
        )


def _check_schedule(args: argparse.Namespace) -> None:
    if args.train_iters < 1:
        raise ConfigError(f"--train-iters must be at least 1, got {args.train_iters}")
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ConfigError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
            f"{args.lr_decay_iters} (default: --train-iters): lower the warmup, or leave it "
            "out (the default fits any --train-iters)"
        )
    # Without psutil, the writer processes of megatron-core's torch_dist format die at their
    # start and the save waits for them forever.
    if args.save is not None and importlib.util.find_spec("psutil") is None:
        raise ConfigError(
            "--save needs psutil for megatron-core's checkpoint writer: pip install psutil"
        )
    if args.load is not None:
        try:
            check_checkpoint(args.load)
        except CheckpointError as error:
            raise ConfigError(str(error)) from None
    # megatron-core's distributed optimizer checkpoints Adam's state only (main weights,
    # exp_avg, exp_avg_sq): SGD's momentum would be lost without a word.
    checkpointing = args.save is not None or args.load is not None
    if checkpointing and args.use_distributed_optimizer and args.optimizer != "adam":
        raise ConfigError(
            f"--use-distributed-optimizer checkpoints hold Adam's state only, not --optimizer "
            f"{args.optimizer}'s: use --optimizer adam, or drop --use-distributed-optimizer"
        )


def attention_kernel(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[str, str]:
    """The local attention kernel this run will use, and why that one."""
    if args.megatron_attention:
        return "Megatron DotProductAttention", "--megatron-attention"
    backend = args.usp_attn_backend
    try:
        kernel = get_kernel(backend, device, dtype)
    except ValueError:
        raise ConfigError(_backend_refusal(backend, device, dtype)) from None
    name = kernel.name
    if name == "torch":
        name = f"torch -> {kernel.pick(device, dtype).name}"
    if backend != "auto":
        return name, f"--usp-attn-backend {backend}"
    if device.type != "cuda":
        return name, "auto on CPU: the plain-torch kernel"
    if kernel.name == "flash_attn":
        return name, "auto: flash-attn is installed"
    if dtype == torch.float32:
        return name, "auto in float32: cuDNN and flash kernels need --bf16"
    return name, "auto: flash-attn not installed, PyTorch's fastest SDPA op"


def _backend_refusal(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    needs = []
    if device.type != "cuda":
        needs.append("a CUDA device (this run is on CPU)")
    elif dtype == torch.float32 and backend in ("flash_attn", "torch_cudnn", "torch_flash"):
        needs.append("--bf16")
    if backend == "flash_attn" and not flash_attn_importable():
        needs.append("the flash-attn package (pip install flash-attn)")
    reason = f": it needs {' and '.join(needs)}" if needs else ""
    auto = get_kernel("auto", device, dtype).name
    return (
        f"--usp-attn-backend {backend} cannot run on {device.type} in {_name(dtype)}{reason}; "
        f"available here: {', '.join(available_backends(device, dtype))}. Use "
        f"--usp-attn-backend auto (here: {auto})"
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_data(args: argparse.Namespace) -> DataFacts:
    """The dataset exists, holds at least one sample, and its token ids fit the vocabulary."""
    vocab = tokenizer_for(args).vocab_size
    if args.data_path is None:
        documents = default_documents()
        tokens = sum(len(ByteTokenizer().tokenize(text)) + 1 for text in documents)
        prefix = str(Path(args.data_cache_path) / "pydoc_topics_bytes")
        description = "embedded corpus (Python's pydoc_data.topics, byte-level)"
        return DataFacts(description, prefix, len(documents), tokens, vocab)
    prefix = args.data_path
    missing = [p for p in (get_idx_path(prefix), get_bin_path(prefix)) if not os.path.isfile(p)]
    if missing:
        raise ConfigError(
            f"--data-path {prefix}: no {' or '.join(missing)}; give the prefix of a Megatron "
            "indexed dataset (PREFIX.bin + PREFIX.idx), or leave --data-path out for the "
            "embedded corpus"
        )
    dataset = IndexedDataset(prefix)
    tokens = int(dataset.sequence_lengths.sum())
    if tokens <= args.seq_length:
        raise ConfigError(
            f"--data-path {prefix} holds {tokens} tokens, fewer than one sample of "
            f"--seq-length {args.seq_length} + 1"
        )
    scanned = min(tokens, MAX_TOKENS_SCANNED)
    ids = np.memmap(get_bin_path(prefix), dtype=dataset.index.dtype, mode="r", shape=(scanned,))
    largest = int(ids.max())
    if largest >= vocab:
        have, fix = f"--vocab-size {vocab}", f"raise --vocab-size to at least {largest + 1}"
        if args.vocab_size is None:
            have = f"{vocab} ids (bytes: no --vocab-size)"
            fix = "pass --vocab-size, e.g. 50304 for GPT-2 tokens"
        raise ConfigError(
            f"--data-path {prefix} has token id {largest}, beyond the vocabulary of {have}: {fix}"
        )
    documents = len(dataset.document_indices) - 1
    return DataFacts(f"{prefix} ({dataset.index.dtype.__name__} tokens)", prefix, documents,
                     tokens, vocab)  # fmt: skip
