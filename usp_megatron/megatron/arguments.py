"""Megatron-LM style flags for USP and their validation.

``add_usp_args`` is an ``extra_args_provider``. ``apply_usp_args`` runs before Megatron's own
``validate_args`` (it sets ``context_parallel_size = U * R`` and the hierarchical sizes
``[U, R]`` so Megatron builds the groups and checks the sequence length);
``validate_usp_args`` runs after it, when derived values such as ``seq_length`` are final.
USP is on when either degree is above 1; otherwise both leave the arguments alone. A degree
below 1 is an error, never a way to turn USP off.
"""

from __future__ import annotations

import argparse

from usp_megatron.kernels import BACKENDS
from usp_megatron.layout import RING_IMPLS, check_seq_len
from usp_megatron.megatron.validation import (
    check_attention_options,
    check_context_parallel,
    check_heads,
    check_position_embedding,
)


def add_usp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--usp-ulysses-degree``, ``--usp-ring-degree``, ``--usp-ring-impl``,
    ``--usp-attn-backend``; returns the parser (the ``extra_args_provider`` contract)."""
    group = parser.add_argument_group(title="usp (unified sequence parallelism)")
    group.add_argument(
        "--usp-ulysses-degree",
        type=int,
        default=1,
        help="Ranks that exchange heads for sequence by all-to-all (DeepSpeed-Ulysses); "
        "inside a node. Context-parallel size becomes ulysses x ring degree.",
    )
    group.add_argument(
        "--usp-ring-degree",
        type=int,
        default=1,
        help="Ranks that pass key/value blocks around a ring (Ring attention).",
    )
    group.add_argument(
        "--usp-ring-impl",
        choices=RING_IMPLS,
        default="zigzag",
        help="Sequence layout of the ring: zigzag (Megatron's own split, load-balanced), "
        "stripe (token t on ring rank t %% R) or basic (contiguous chunks).",
    )
    group.add_argument(
        "--usp-attn-backend",
        choices=BACKENDS,
        default="auto",
        help="Local attention kernel; auto picks the fastest present (reference on CPU).",
    )
    return parser


def _check_degree(flag: str, value: object, meaning_of_one: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{flag} must be an integer >= 1 (1: {meaning_of_one}), got {value!r}"
        )


def usp_enabled(args: argparse.Namespace) -> bool:
    """Whether the flags ask for USP; refuses degrees below 1 rather than reading them as off
    (a product test would turn ``U = 0, R = 4`` into plain data parallelism)."""
    u = getattr(args, "usp_ulysses_degree", 1)
    r = getattr(args, "usp_ring_degree", 1)
    _check_degree("--usp-ulysses-degree", u, "no all-to-all")
    _check_degree("--usp-ring-degree", r, "no ring")
    return u > 1 or r > 1


def apply_usp_args(args: argparse.Namespace) -> argparse.Namespace:
    """Turn the USP degrees into Megatron's context-parallel settings (before validate_args)."""
    if not usp_enabled(args):
        return args
    u, r = args.usp_ulysses_degree, args.usp_ring_degree
    check_context_parallel(
        u,
        r,
        getattr(args, "context_parallel_size", 1),
        getattr(args, "hierarchical_context_parallel_sizes", None),
    )
    args.context_parallel_size = u * r
    args.hierarchical_context_parallel_sizes = [u, r]
    return args


def validate_usp_args(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse combinations USP cannot run, naming the flag to change (after validate_args)."""
    if not usp_enabled(args):
        return args
    u, r, impl = args.usp_ulysses_degree, args.usp_ring_degree, args.usp_ring_impl
    check_context_parallel(
        u, r, args.context_parallel_size, getattr(args, "hierarchical_context_parallel_sizes", None)
    )
    check_heads(args.num_attention_heads, args.tensor_model_parallel_size, u)
    check_seq_len(args.seq_length, u, r, impl)
    check_attention_options(
        attention_dropout=getattr(args, "attention_dropout", 0.0),
        multi_latent_attention=getattr(args, "multi_latent_attention", False),
        softmax_type=getattr(args, "softmax_type", "vanilla"),
        window_size=getattr(args, "window_size", None),
    )
    check_position_embedding(getattr(args, "position_embedding_type", "rope"), impl)
    refused = {
        "use_legacy_models": "--use-legacy-models (USP is a megatron-core module)",
        "reset_attention_mask": "--reset-attention-mask (document masks are not causal masks)",
        "hybrid_context_parallel": "--hybrid-context-parallel (its own context parallelism)",
        "experimental_attention_variant": "--experimental-attention-variant (own attention)",
        "heterogeneous_layers_config_path": "--heterogeneous-layers-config-path (its specs "
        "hard-code TransformerEngine attention)",
    }
    for name, flag in refused.items():
        if getattr(args, name, None):
            raise ValueError(f"USP does not compose with {flag}; drop it or drop --usp-* flags")
    return args
