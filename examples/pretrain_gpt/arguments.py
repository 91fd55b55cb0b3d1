"""Flags of the GPT pretraining driver: Megatron-LM's names, plus the plugin's ``--usp-*``.

Defaults are the CPU demo: a tiny model that trains in a couple of minutes on 2 cores.
"""

from __future__ import annotations

import argparse

from report import add_report_args

from usp_megatron.megatron import add_usp_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
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
    packing = "--reset-attention-mask" if args.reset_attention_mask else "--pack-documents"
    args.pack_documents = args.pack_documents or args.reset_attention_mask
    if args.pack_documents and args.micro_batch_size != 1:
        raise ValueError(
            f"{packing} packs each sample into one THD sequence: it needs "
            f"--micro-batch-size 1, got {args.micro_batch_size}"
        )
    if not args.pack_documents and (
        args.pack_pad_multiple or not args.document_mask or args.pack_documents_per_sample
    ):
        raise ValueError(
            "--pack-pad-multiple, --pack-documents-per-sample and --no-document-mask need "
            "--pack-documents"
        )
    per_sample = args.pack_documents_per_sample
    if per_sample is not None and not 1 <= per_sample <= args.seq_length:
        raise ValueError(
            f"--pack-documents-per-sample must be between 1 and --seq-length "
            f"{args.seq_length}, got {per_sample}"
        )
    return args
