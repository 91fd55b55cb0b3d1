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
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from checkpoint import CheckpointError, check_same_run, read_checkpoint
from corpus import ByteTokenizer, default_documents
from data import tokenizer_for
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from usp_megatron.checks import check_window
from usp_megatron.kernels import available_backends, get_kernel
from usp_megatron.kernels.flash_attn import flash_attn_importable
from usp_megatron.megatron import apply_usp_args, validate_usp_args
from usp_megatron.megatron.arguments import usp_enabled, usp_layout
from usp_megatron.megatron.grad_norm import fallback_sites
from usp_megatron.megatron.validation import (
    check_attention_options,
    check_causal_window,
    check_heads,
    check_packed_documents,
)

# Token ids are checked against the vocabulary over at most this many tokens of a dataset
# (a full scan of a large corpus would cost minutes on every rank before training).
MAX_TOKENS_SCANNED = 1 << 24
# What megatron-core recomputes selectively in this driver's GPT (local layers, no
# TransformerEngine). Its other modules: moe_act, moe, shared_experts and mla_up_proj need MoE
# or multi-latent attention; on 0.16.1 layernorm fails in the first forward (NameError on
# TransformerEngine's FP8GlobalStateManager) and mlp's backward recomputes itself without end
# (the checkpoint returns the bias parameter it skipped adding), both seen on CPU.
RECOMPUTE_MODULES = ("core_attn",)

# Integer flags and their smallest valid value (None: not given, nothing to check). Below
# it they used to fail after the model was built (a ZeroDivisionError for --log-interval 0,
# a SIGFPE for --seq-length 0) or to train something else than asked (--ffn-hidden-size 0).
AT_LEAST = (
    ("--num-layers", 1, "transformer layers"),
    ("--hidden-size", 1, "the model width"),
    ("--num-attention-heads", 1, "query heads"),
    ("--ffn-hidden-size", 1, "the MLP's hidden size"),
    ("--seq-length", 1, "tokens per sequence"),
    ("--tensor-model-parallel-size", 1, "1: no tensor parallelism"),
    ("--micro-batch-size", 1, "sequences per forward pass"),
    ("--global-batch-size", 1, "sequences per iteration"),
    ("--train-iters", 1, "iterations to train"),
    ("--log-interval", 1, "a log line every N iterations"),
    ("--save-interval", 1, "a checkpoint every N iterations"),
    ("--lr-warmup-iters", 0, "iterations of linear warmup; 0: none"),
    ("--lr-decay-iters", 1, "iterations of cosine decay"),
    ("--window-attn-skip-freq", 1, "every N-th layer attends globally"),
    ("--vocab-size", 1, "token ids of --data-path"),
    ("--pack-documents-per-sample", 1, "documents cut from each sample"),
    ("--usp-gpus-per-node", 1, "GPUs of one node"),
)
# The optimizer's learning-rate schedule on resume: megatron-core's OptimizerParamScheduler
# compares these of the checkpoint with the run's, and the flag that sets each.
SCHEDULE_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters",
    "lr_decay_style": "the decay style",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
    "wd_incr_steps": "--lr-decay-iters",
    "wd_incr_style": "the weight-decay style",
}


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
    grad_norm: str
    data: DataFacts
    #: Flags this configuration accepts but does not use, each with why (the banner says so).
    ignored: tuple[str, ...] = ()
    #: The checkpoint this run resumes from and whose learning-rate schedule runs; None
    #: when it starts from scratch.
    resume: str | None = None


def use_cuda(args: argparse.Namespace) -> bool:
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def lr_schedule(args: argparse.Namespace) -> dict:
    """The arguments of megatron-core's ``OptimizerParamScheduler`` (also the keys of its
    state that a resume compares): cosine from ``--lr`` to ``--min-lr`` over
    ``--lr-decay-iters`` after a linear warmup, constant weight decay."""
    return {
        "max_lr": args.lr,
        "min_lr": args.min_lr,
        "lr_warmup_steps": args.lr_warmup_iters,
        "lr_decay_steps": args.lr_decay_iters,
        "lr_decay_style": "cosine",
        "start_wd": args.weight_decay,
        "end_wd": args.weight_decay,
        "wd_incr_steps": args.lr_decay_iters,
        "wd_incr_style": "constant",
    }


def check_configuration(
    args: argparse.Namespace, world_size: int, local_world_size: int | None = None
) -> Plan:
    """Refuse with :class:`ConfigError` what cannot run; set ``context_parallel_size``,
    ``hierarchical_context_parallel_sizes`` and ``data_parallel_size`` on ``args``.

    Touches no process group and no accelerator memory: it runs before both exist.
    """
    if local_world_size is None:  # torchrun's processes on this node, else one node
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    _check_ranges(args)
    auto_degrees = args.usp_ulysses_degree == "auto"
    device = _check_device(args, local_world_size)
    _check_context_parallel(args)
    ignored = ignored_flags(args, auto_degrees)
    args.data_parallel_size = _check_world(args, world_size)
    _check_heads(args)
    _check_seq_length(args)
    _check_attention(args)
    _check_packed_documents(args)
    _check_recompute(args)
    try:
        validate_usp_args(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_outputs(args)
    _check_checkpointing(args)
    resume = _check_resume(args)
    if resume is None:
        ignored += [
            f"{flag} (no checkpoint to resume)"
            for flag, given in (
                ("--override-opt_param-scheduler", args.override_opt_param_scheduler),
                ("--use-checkpoint-opt_param-scheduler", args.use_checkpoint_opt_param_scheduler),
            )
            if given
        ]
    _check_lr_schedule(args)
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
        grad_norm=grad_norm_kernel(args),
        data=check_data(args),
        ignored=tuple(ignored),
        resume=resume,
    )


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _check_ranges(args: argparse.Namespace) -> None:
    """Every number in its valid range, before anything computes with it."""
    for flag, minimum, meaning in AT_LEAST:
        value = getattr(args, _dest(flag))
        if value is not None and value < minimum:
            raise ConfigError(f"{flag} must be at least {minimum} ({meaning}), got {value}")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be between 0 and 2**32 - 1 (numpy's), got {args.seed}")
    for flag, low, high, meaning in (
        ("--lr", 0.0, math.inf, "the peak learning rate"),
        ("--min-lr", 0.0, args.lr, f"the cosine decays from --lr {args.lr:g} to it"),
        ("--weight-decay", 0.0, math.inf, "decoupled weight decay"),
        ("--clip-grad", 0.0, math.inf, "the gradient-norm clip; 0: no clipping"),
        ("--hidden-dropout", 0.0, 1.0, "a probability"),
        ("--attention-dropout", 0.0, 1.0, "a probability"),
        ("--peak-tflops", 1e-9, math.inf, "TFLOP/s of one GPU, for MFU"),
    ):
        value = getattr(args, _dest(flag))
        if value is not None and not (low <= value <= high and math.isfinite(value)):
            bound = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
            if flag == "--peak-tflops":
                bound = "positive"
            raise ConfigError(f"{flag} must be {bound} ({meaning}), got {value}")


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
    if args.ffn_hidden_size % tp:
        raise ConfigError(
            f"--ffn-hidden-size {args.ffn_hidden_size} must be divisible by "
            f"--tensor-model-parallel-size {tp}: tensor parallelism splits the MLP"
        )
    head_dim = args.hidden_size // heads
    if args.position_embedding_type == "rope" and head_dim % 2:
        fits = [h * heads for h in (head_dim - 1, head_dim + 1) if h > 0]
        raise ConfigError(
            f"--hidden-size {args.hidden_size} / --num-attention-heads {heads} gives head "
            f"dimension {head_dim}, but RoPE rotates pairs of channels: it must be even (e.g. "
            f"--hidden-size {' or '.join(map(str, fits))}), or use --position-embedding-type "
            "learned_absolute"
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


def _check_attention(args: argparse.Namespace) -> None:
    """A sliding window the causal model can take, and what USP attention refuses at any
    context-parallel size (it is the core attention unless --megatron-attention)."""
    window = args.window_size
    if window is not None:
        try:
            check_window(tuple(window))
        except ValueError as error:
            raise ConfigError(f"--window-size {' '.join(map(str, window))}: {error}") from None
        try:
            check_causal_window(window, unbounded_right=False)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if not args.megatron_attention:
        try:
            check_attention_options(attention_dropout=args.attention_dropout)
        except ValueError as error:
            raise ConfigError(f"{error} (or --megatron-attention, without USP)") from None


def _check_packed_documents(args: argparse.Namespace) -> None:
    """What USP attention refuses for packed documents (THD), which would otherwise come
    from the first forward, after the model is built, once per rank."""
    packing = {
        "--pack-pad-multiple": args.pack_pad_multiple is not None,
        "--pack-documents-per-sample": args.pack_documents_per_sample is not None,
        "--no-document-mask": not args.document_mask,
    }
    if not args.pack_documents:
        given = [flag for flag, present in packing.items() if present]
        if given:
            one = len(given) == 1
            raise ConfigError(
                f"{' and '.join(given)} need{'s' if one else ''} --pack-documents: add "
                f"--pack-documents, or drop {'it' if one else 'them'}"
            )
        return
    what = "--reset-attention-mask" if args.reset_attention_mask else "--pack-documents"
    if args.micro_batch_size != 1:
        raise ConfigError(
            f"{what} packs each sample into one THD sequence: it needs --micro-batch-size 1, "
            f"got {args.micro_batch_size}"
        )
    if args.megatron_attention:
        raise ConfigError(
            f"--megatron-attention with {what}: Megatron's DotProductAttention takes no packed "
            "sequences (megatron-core asks for TransformerEngine's); drop --megatron-attention "
            "(USP's attention takes them at any context-parallel size)"
        )
    per_sample = args.pack_documents_per_sample
    if per_sample is not None and per_sample > args.seq_length:
        raise ConfigError(
            f"--pack-documents-per-sample must be between 1 and --seq-length "
            f"{args.seq_length} (a document per token at most), got {per_sample}"
        )
    cp = args.context_parallel_size
    heads = args.num_attention_heads // args.tensor_model_parallel_size
    u = args.usp_ulysses_degree if usp_enabled(args) else 1
    try:
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


def _check_recompute(args: argparse.Namespace) -> None:
    """Megatron-LM's recompute flags in the combinations megatron-core's TransformerConfig
    takes (it would refuse the others with an assert or a ValueError after the groups are
    up, or silently ignore a flag)."""
    granularity, method = args.recompute_granularity, args.recompute_method
    layers, modules = args.recompute_num_layers, args.recompute_modules
    if granularity is None:
        given = [flag for flag, value in (("--recompute-method", method),
                 ("--recompute-num-layers", layers), ("--recompute-modules", modules))
                 if value is not None]  # fmt: skip
        if given:
            raise ConfigError(
                f"{given[0]} needs --recompute-granularity (full for --recompute-method and "
                "--recompute-num-layers, selective for --recompute-modules); add it, or drop "
                f"{given[0]}"
            )
        return
    if granularity == "selective":
        if method is not None or layers is not None:
            flag = "--recompute-method" if method is not None else "--recompute-num-layers"
            raise ConfigError(
                f"{flag} applies to --recompute-granularity full, not selective (which "
                "recomputes --recompute-modules in every layer): drop it, or use full"
            )
        unknown = [m for m in modules or () if m not in RECOMPUTE_MODULES]
        if unknown:
            raise ConfigError(
                f"--recompute-modules {' '.join(unknown)}: this driver's GPT (megatron-core's "
                f"local layers) recomputes only {', '.join(RECOMPUTE_MODULES)} selectively "
                "(layernorm and mlp fail there without TransformerEngine, the others need MoE "
                "or multi-latent attention): use --recompute-modules core_attn, or "
                "--recompute-granularity full"
            )
        return
    if modules is not None:
        raise ConfigError(
            f"--recompute-modules {' '.join(modules)} applies to --recompute-granularity "
            "selective; full recomputes whole layers: drop --recompute-modules, or use selective"
        )
    if method is None or layers is None:
        raise ConfigError(
            "--recompute-granularity full needs --recompute-method and --recompute-num-layers: "
            "add --recompute-method uniform --recompute-num-layers 1 to recompute every layer"
        )
    total = args.num_layers
    if method == "uniform" and (layers < 1 or total % layers):
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        raise ConfigError(
            f"--recompute-num-layers {layers} with --recompute-method uniform must divide "
            f"--num-layers {total} (every chunk of that many layers is recomputed): choose one "
            f"of {divisors}"
        )
    if method == "block" and not 1 <= layers <= total:
        raise ConfigError(
            f"--recompute-num-layers {layers} with --recompute-method block is the number of "
            f"layers recomputed: choose 1 to --num-layers {total}"
        )


def grad_norm_kernel(args: argparse.Namespace) -> str:
    """What computes the gradient norm and clips (megatron-core decides at import)."""
    if not fallback_sites():
        return "megatron-core's fused kernels (TransformerEngine or apex)"
    if args.usp_foreach_grad_norm:
        return (
            "fused torch._foreach ops (megatron-core has neither TransformerEngine nor apex; "
            "--usp-no-foreach-grad-norm for its per-tensor fallback)"
        )
    return (
        "megatron-core's per-tensor fallback (--usp-no-foreach-grad-norm): one host "
        "synchronisation per parameter tensor"
    )


def _check_lr_schedule(args: argparse.Namespace) -> None:
    """What megatron-core's OptimizerParamScheduler would assert after the model is built."""
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ConfigError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
            f"{args.lr_decay_iters} (default: --train-iters): lower the warmup, or leave it "
            "out (the default fits any --train-iters)"
        )


def _check_outputs(args: argparse.Namespace) -> None:
    """Where the run writes must take what it writes: found at the first save, or after
    the last iteration (the history file), the mistake would cost the run."""
    for flag, path, directory in (
        ("--save", args.save, True),
        ("--tensorboard-dir", args.tensorboard_dir, True),
        ("--data-cache-path", args.data_cache_path, True),
        ("--history-json", args.history_json, False),
    ):
        if path is None:
            continue
        target = Path(path)
        if directory and target.exists() and not target.is_dir():
            raise ConfigError(f"{flag} {path} is a file: give a directory (created if missing)")
        if not directory and target.is_dir():
            raise ConfigError(f"{flag} {path} is a directory: give a file name")
        existing = next(parent for parent in target.absolute().parents if parent.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(
                f"{flag} {path}: nothing can be written below {existing} (a file, or not "
                "writable): give a path in a writable directory"
            )


def _check_checkpointing(args: argparse.Namespace) -> None:
    # Without psutil, the writer processes of megatron-core's torch_dist format die at their
    # start and the save waits for them forever.
    if args.save is not None and importlib.util.find_spec("psutil") is None:
        raise ConfigError(
            "--save needs psutil for megatron-core's checkpoint writer: pip install psutil"
        )
    # megatron-core's distributed optimizer checkpoints Adam's state only (main weights,
    # exp_avg, exp_avg_sq): SGD's momentum would be lost without a word.
    checkpointing = args.save is not None or args.load is not None
    if checkpointing and args.use_distributed_optimizer and args.optimizer != "adam":
        raise ConfigError(
            f"--use-distributed-optimizer checkpoints hold Adam's state only, not --optimizer "
            f"{args.optimizer}'s: use --optimizer adam, or drop --use-distributed-optimizer"
        )


def _check_resume(args: argparse.Namespace) -> str | None:
    """A ``--load`` checkpoint this run can resume from, and the learning-rate schedule it
    resumes with, by Megatron's rule (megatron-core's ``OptimizerParamScheduler``): a
    schedule that differs from the checkpoint's is refused unless
    ``--override-opt_param-scheduler`` (this run's) or
    ``--use-checkpoint-opt_param-scheduler`` (the checkpoint's; its values are then set on
    ``args``, so that the banner shows what runs) says which one. Returns the banner's line
    about the resume, None without one."""
    if args.load is None:
        return None
    try:
        saved = read_checkpoint(args.load)
        if saved is not None:
            check_same_run(args, saved[1], saved[2]["run"])
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    if saved is None:
        return None
    iteration, path, common = saved
    where = f"from iteration {iteration} of {args.load}"
    if iteration >= args.train_iters:
        return f"{where}: nothing to do (--train-iters {args.train_iters})"
    override = args.override_opt_param_scheduler
    use_checkpoint = args.use_checkpoint_opt_param_scheduler
    if override and use_checkpoint:
        raise ConfigError(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
            "contradict each other: give one (this run's schedule or the checkpoint's)"
        )
    mine, theirs = lr_schedule(args), common["scheduler"]
    changes = {}  # flag -> (checkpoint's, this run's), each flag once
    for key, flag in SCHEDULE_FLAGS.items():
        if key in theirs and theirs[key] != mine[key]:
            changes.setdefault(flag, (theirs[key], mine[key]))
    described = "; ".join(f"{flag} saved {old}, now {new}" for flag, (old, new) in changes.items())
    if not changes:
        return f"{where}; learning-rate schedule as saved"
    if override:
        return (
            f"{where}; learning-rate schedule this run's, not the checkpoint's ({described}: "
            "--override-opt_param-scheduler)"
        )
    if use_checkpoint:
        args.lr, args.min_lr = theirs["max_lr"], theirs["min_lr"]
        args.lr_warmup_iters, args.lr_decay_iters = (
            theirs["lr_warmup_steps"],
            theirs["lr_decay_steps"],
        )
        args.weight_decay = theirs["start_wd"]
        return (
            f"{where}; learning-rate schedule the checkpoint's, not this run's "
            f"({described}: --use-checkpoint-opt_param-scheduler)"
        )
    raise ConfigError(
        f"--load {args.load}: the checkpoint of iteration {iteration} ({path}) has another "
        f"learning-rate schedule than this run ({described}; --lr-decay-iters defaults to "
        "--train-iters): resume with --use-checkpoint-opt_param-scheduler to keep the "
        "checkpoint's, or with --override-opt_param-scheduler to switch to this run's "
        "(Megatron-LM's rule)"
    )


def ignored_flags(args: argparse.Namespace, auto_degrees: bool) -> list[str]:
    """Flags that this configuration accepts but does not use, each with why: the banner
    lists them (a typed flag that changes nothing must not pass in silence).
    ``auto_degrees``: whether ``--usp-ulysses-degree auto`` was given (resolved by now)."""
    defaults = _defaults()
    window = args.window_size is not None and tuple(args.window_size) != (-1, -1)
    rules = (
        ("save_interval", args.save is None, "no --save: nothing is saved"),
        ("usp_ring_impl", not usp_enabled(args), "no context parallelism: whole sequences "
         "per rank"),
        ("usp_attn_backend", args.megatron_attention, "--megatron-attention runs Megatron's "
         "DotProductAttention"),
        ("usp_gpus_per_node", not auto_degrees, "used by --usp-ulysses-degree auto only"),
        ("count_host_syncs", not use_cuda(args), "CUDA only; this run is on CPU"),
        ("vocab_size", args.data_path is None, "the embedded corpus is byte-level, "
         f"{ByteTokenizer.vocab_size} ids"),
        ("window_attn_skip_freq", not window, "no sliding --window-size"),
    )  # fmt: skip
    notes = []
    for dest, unused, why in rules:
        value = getattr(args, dest)
        if unused and value != defaults[dest]:
            flag = "--" + dest.replace("_", "-")
            shown = "" if isinstance(value, bool) else f" {value}"
            notes.append(f"{flag}{shown} ({why})")
    return notes


def _defaults() -> dict:
    """The driver's flag defaults (a flag set to its default was not typed, or changes
    nothing anyway)."""
    from arguments import build_parser  # arguments.py imports this module

    return vars(build_parser().parse_args([]))


def attention_kernel(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[str, str]:
    """The local attention kernel this run's layers will use (each kind, where windowed and
    full-length layers alternate), and why that one."""
    if args.megatron_attention:
        return "Megatron DotProductAttention", "--megatron-attention"
    backend = args.usp_attn_backend
    try:
        window = check_window(None if args.window_size is None else tuple(args.window_size))
    except ValueError:
        window = None  # a malformed window is refused with its own message
    documents = bool(args.pack_documents)
    kinds = {"": window is not None}
    if window is not None and args.window_attn_skip_freq:
        kinds = {"windowed layers": True, "full-length layers": False}
    chosen = {}
    for layers, windows in kinds.items():
        try:
            chosen[layers] = get_kernel(backend, device, dtype, windows, documents).name
        except ValueError as error:
            if backend not in available_backends(device, dtype):
                raise ConfigError(_backend_refusal(backend, device, dtype)) from None
            flag = "--window-size" if windows else "--pack-documents"
            raise ConfigError(f"--usp-attn-backend {backend} with {flag}: {error}") from None
    if len(set(chosen.values())) == 1:
        name = next(iter(chosen.values()))
    else:
        name = ", ".join(f"{kernel} ({layers})" for layers, kernel in chosen.items())
    if backend != "auto":
        return name, f"--usp-attn-backend {backend}"
    if device.type != "cuda":
        return name, "auto on CPU: the plain-torch kernel"
    if dtype == torch.float32:
        return name, "auto in float32: cuDNN and flash kernels need --bf16"
    return name, "auto: the first kernel present of usp_megatron.kernels.PREFERENCE"


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
