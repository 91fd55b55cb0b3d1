"""Flags of the GPT pretraining driver: Megatron-LM's names, plus the plugin's ``--usp-*``.

Defaults are the CPU demo: a tiny model that trains in about a minute on 2 cores. Values
are checked in ``preflight.py``, before anything is built.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import IO, NoReturn

from preflight import ConfigError
from report import add_report_args

from usp_megatron.megatron import add_usp_args


class _Parser(argparse.ArgumentParser):
    """argparse that speaks from one rank: a flag error becomes a :class:`ConfigError`
    (``pretrain_gpt.py`` prints it once, from rank 0, and every rank exits 1) instead of
    a usage message per rank, and ``--help`` prints on rank 0 only."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} ({self.prog} --help lists every flag)")

    def print_help(self, file: IO[str] | None = None) -> None:
        if os.environ.get("RANK", "0") == "0":
            super().print_help(file or sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain_gpt.py", description=__doc__, allow_abbrev=False)
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--hidden-size", type=int, default=64)
    model.add_argument("--num-attention-heads", type=int, default=8)
    model.add_argument(
        "--num-query-groups", type=int, default=None, help="key/value heads (GQA); default MHA"
    )
    model.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    model.add_argument("--seq-length", type=int, default=128)
    model.add_argument(
        "--position-embedding-type", choices=("rope", "learned_absolute"), default="rope"
    )
    model.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    model.add_argument("--attention-dropout", type=float, default=0.0)
    model.add_argument("--hidden-dropout", type=float, default=0.0)
    model.add_argument(
        "--window-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("LEFT", "RIGHT"),
        help="sliding-window attention: token i sees tokens i-LEFT .. i+RIGHT (-1: unbounded; "
        "causal models use RIGHT 0)",
    )
    model.add_argument(
        "--window-attn-skip-freq",
        type=int,
        default=None,
        help="every N-th layer attends globally, the others in the window (Megatron's rule)",
    )
    model.add_argument(
        "--megatron-attention",
        action="store_true",
        help="Megatron's own DotProductAttention instead of USP's (context-parallel size 1 "
        "only): an independent reference for loss parity",
    )

    model.add_argument(
        "--device-initialization",
        action="store_true",
        help="draw the initial weights on the GPU (megatron-core's use_cpu_initialization="
        "False): a faster start for speed runs. Another model than the default CPU "
        "initialisation, and one that depends on the tensor-parallel size (each TP rank draws "
        "its own shard), so loss parity and checkpoint tests keep the default",
    )

    recompute = parser.add_argument_group("activation recompute (Megatron-LM's flags)")
    recompute.add_argument(
        "--recompute-granularity",
        choices=("full", "selective"),
        default=None,
        help="full: keep only each recomputed layer's input and run the layer again in the "
        "backward (needs --recompute-method and --recompute-num-layers); selective: run only "
        "--recompute-modules again. Default: keep every activation",
    )
    recompute.add_argument(
        "--recompute-method",
        choices=("uniform", "block"),
        default=None,
        help="with full: uniform recomputes every layer, in chunks of --recompute-num-layers; "
        "block recomputes only the first --recompute-num-layers layers",
    )
    recompute.add_argument(
        "--recompute-num-layers",
        type=int,
        default=None,
        help="with full: layers per chunk (uniform; must divide --num-layers) or layers "
        "recomputed (block)",
    )
    recompute.add_argument(
        "--recompute-modules",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="with selective: what runs again in the backward; core_attn (the default and the "
        "one megatron-core's local layers recompute: the attention itself, with USP its "
        "all-to-all and ring too)",
    )

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="set by the --usp-* degrees; with --usp-ulysses-degree auto, the size split into "
        "U x R",
    )
    parallel.add_argument("--use-distributed-optimizer", action="store_true")
    add_usp_args(parser)

    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, default=1)
    train.add_argument("--global-batch-size", type=int, default=8)
    train.add_argument("--train-iters", type=int, default=60)
    train.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--min-lr", type=float, default=3e-4)
    train.add_argument(
        "--lr-warmup-iters", type=int, default=None, help="default 3, fewer for short runs"
    )
    train.add_argument(
        "--lr-decay-iters", type=int, default=None, help="cosine decay length; default: all"
    )
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--clip-grad", type=float, default=1.0)
    train.add_argument(
        "--override-opt_param-scheduler",
        "--override-opt-param-scheduler",
        dest="override_opt_param_scheduler",
        action="store_true",
        help="on resume: this run's learning-rate schedule (--lr, --min-lr, --lr-warmup-iters, "
        "--lr-decay-iters, --weight-decay) replaces the checkpoint's (Megatron-LM's flag)",
    )
    train.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        dest="use_checkpoint_opt_param_scheduler",
        action="store_true",
        help="on resume: keep the checkpoint's learning-rate schedule, whatever these flags "
        "say (Megatron-LM's flag). Without either, a resume whose schedule differs is refused",
    )
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--bf16", action="store_true", help="bf16 model, float32 main weights")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--log-interval", type=int, default=1)
    train.add_argument(
        "--count-host-syncs",
        action="store_true",
        help="CUDA: count the operations of each iteration that make the host wait for the "
        "GPU (PyTorch's sync debug mode), into the history (host_syncs, host_sync_sites)",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-path",
        default=None,
        help="prefix of a Megatron .bin/.idx dataset (byte-level or GPT-2 tokens, see "
        "--vocab-size); default: the embedded pydoc corpus, written on first run",
    )
    data.add_argument("--data-cache-path", default="runs/data", help="corpus and index cache")
    data.add_argument(
        "--vocab-size", type=int, default=None, help="tokens of --data-path (default: bytes)"
    )
    data.add_argument(
        "--pack-documents",
        action="store_true",
        help="packed documents (THD): cut samples at end-of-document tokens, pad each "
        "document, mask attention between documents (the default corpus then has one "
        "document per line); needs --micro-batch-size 1",
    )
    data.add_argument(
        "--pack-pad-multiple",
        type=int,
        default=None,
        help="pad each packed document to a multiple of this (default 2 x context-parallel "
        "size; fix it to compare layouts on the same samples)",
    )
    data.add_argument(
        "--pack-documents-per-sample",
        type=int,
        default=None,
        help="with --pack-documents: cut every sample into this many equal documents instead "
        "of at end-of-document tokens (a fixed packing, for speed runs)",
    )
    data.add_argument(
        "--no-document-mask",
        dest="document_mask",
        action="store_false",
        help="with --pack-documents: let documents attend to each other (a negative control)",
    )
    # Megatron-LM's document flags, with their meaning there; --pack-documents is all three.
    data.add_argument(
        "--reset-attention-mask",
        action="store_true",
        help="attention within documents (Megatron-LM's flag): the documents of each sample "
        "are packed, as --pack-documents packs them, with the position ids and loss mask the "
        "two flags below decide",
    )
    data.add_argument(
        "--reset-position-ids",
        action="store_true",
        help="position ids restart at 0 after every end-of-document token (Megatron-LM's flag)",
    )
    data.add_argument(
        "--eod-mask-loss",
        action="store_true",
        help="no loss on end-of-document tokens (Megatron-LM's flag)",
    )

    ckpt = parser.add_argument_group("checkpointing")
    ckpt.add_argument("--save", default=None, help="directory to save checkpoints in")
    ckpt.add_argument("--save-interval", type=int, default=None)
    ckpt.add_argument("--load", default=None, help="directory to resume from (latest)")
    ckpt.add_argument("--history-json", default=None, help="write per-iteration metrics")
    return add_report_args(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters is None:  # an explicit value is checked in preflight.py
        args.lr_warmup_iters = max(0, min(3, args.lr_decay_iters - 1))
    args.hierarchical_context_parallel_sizes = None  # set from the --usp-* degrees
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    # Megatron-LM's --reset-attention-mask keeps attention inside documents: packed here
    # (preflight.py checks the packing flags and names the one typed).
    args.pack_documents = args.pack_documents or args.reset_attention_mask
    return args
