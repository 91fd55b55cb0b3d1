"""Megatron-LM style flags for USP and their validation.

``add_usp_args`` is an ``extra_args_provider``. ``apply_usp_args`` runs before Megatron's own
``validate_args`` (it sets ``context_parallel_size = U * R`` and the hierarchical sizes
``[U, R]`` so Megatron builds the groups and checks the sequence length; with
``--usp-ulysses-degree auto`` it first chooses ``U x R`` for ``--context-parallel-size``);
``validate_usp_args`` runs after it, when derived values such as ``seq_length`` are final.
USP is on when either degree is above 1; otherwise both leave the arguments alone. A degree
below 1 is an error, never a way to turn USP off.

``--cp-comm-type`` (Megatron-LM's, default ``["p2p"]``) is set by ``apply_usp_args`` to what
the degrees do (``usp_cp_comm_type``) unless the user typed it; a typed value must agree.
See :class:`MegatronDefault` for how the two are told apart.
"""

from __future__ import annotations

import argparse
import os

from usp_megatron.checks import check_positive_int
from usp_megatron.degrees import CostModel, degree_costs, pick
from usp_megatron.kernels import BACKENDS
from usp_megatron.layout import LAYOUT_NAMES, SequenceLayout, get_layout
from usp_megatron.megatron.validation import (
    check_attention_options,
    check_causal_window,
    check_context_parallel,
    check_cp_comm_type,
    check_cp_comm_type_layers,
    check_heads,
    check_position_embedding,
    heads_per_tp_rank,
    usp_cp_comm_type,
)

AUTO = "auto"


class MegatronDefault(list):
    """Megatron-LM's own default of ``--cp-comm-type`` (``["p2p"]``), marked as not typed.

    USP must set ``cp_comm_type`` to what its degrees do (``a2a+p2p``, ``a2a``, ``p2p``) yet
    refuse a value the user typed that contradicts them. By value, Megatron's default
    ``["p2p"]`` and a typed ``--cp-comm-type p2p`` are the same list, so ``add_usp_args``
    (which runs after Megatron-LM has added its arguments) replaces the parser's default with
    this subclass of ``list``, equal to it element for element. argparse hands a default to
    the namespace as the object itself, and a typed flag as a new plain list, so the type
    tells them apart. A marked list still is Megatron's default to every reader (a script
    that never calls ``apply_usp_args`` behaves as before); ``apply_usp_args`` replaces it by
    a plain list: USP's value when USP is on, Megatron's own default when it is off, so a
    run without ``--usp-*`` flags gets exactly what it got without the plugin. A sentinel such
    as None would have been unambiguous too, but would have broken every reader of the
    arguments before ``apply_usp_args`` (Megatron-LM tests ``"a2a+p2p" in args.cp_comm_type``).
    """


def _mark_cp_comm_type_default(parser: argparse.ArgumentParser) -> None:
    """Mark Megatron-LM's ``--cp-comm-type`` default as untyped (no-op without that flag)."""
    default = parser.get_default("cp_comm_type")
    if isinstance(default, list) and not isinstance(default, MegatronDefault):
        parser.set_defaults(cp_comm_type=MegatronDefault(default))


def _cp_comm_types(value: str | list | None) -> list:
    """``--cp-comm-type`` as a list: one entry, or one per layer."""
    return [value] if value is None or isinstance(value, str) else list(value)


def _apply_cp_comm_type(args: argparse.Namespace, enabled: bool) -> None:
    """Set ``cp_comm_type`` where the user did not type it; check it where they did."""
    given = getattr(args, "cp_comm_type", None)
    if isinstance(given, MegatronDefault):
        u, r = args.usp_ulysses_degree, args.usp_ring_degree
        args.cp_comm_type = [usp_cp_comm_type(u, r)] if enabled else list(given)
        return
    if not enabled or given is None:
        return
    typed = _cp_comm_types(given)
    u, r = args.usp_ulysses_degree, args.usp_ring_degree
    for value in typed:
        try:
            check_cp_comm_type(value, u, r)
        except ValueError:
            wanted = usp_cp_comm_type(u, r)
            raise ValueError(
                f"--cp-comm-type {' '.join(map(str, typed))} contradicts --usp-ulysses-degree "
                f"{u} x --usp-ring-degree {r}: {value!r} does not describe USP, which "
                f"communicates as {wanted!r} with these degrees; drop --cp-comm-type (USP sets "
                f"it) or pass --cp-comm-type {wanted}"
            ) from None
    check_cp_comm_type_layers(typed, getattr(args, "num_layers", None))
    if len(typed) > 1:
        # One value per layer that all agree: every USP layer communicates as the degrees
        # say, so one value for all (megatron-core 0.16 indexes a per-layer list from 1 and
        # runs past its end at the last layer).
        args.cp_comm_type = [usp_cp_comm_type(u, r)]


def _ulysses_degree(value: str) -> int | str:
    """``--usp-ulysses-degree``: an integer, or ``auto``."""
    if value == AUTO:
        return AUTO
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 1 or 'auto', got {value!r}"
        ) from None


def add_usp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--usp-ulysses-degree``, ``--usp-ring-degree``, ``--usp-ring-impl``,
    ``--usp-attn-backend``, ``--usp-gpus-per-node``, ``--usp-no-foreach-grad-norm``;
    returns the parser (the
    ``extra_args_provider`` contract). Also marks Megatron-LM's ``--cp-comm-type`` default
    as not typed (:class:`MegatronDefault`), where the parser has that flag."""
    _mark_cp_comm_type_default(parser)
    group = parser.add_argument_group(title="usp (unified sequence parallelism)")
    group.add_argument(
        "--usp-ulysses-degree",
        type=_ulysses_degree,
        default=1,
        help="Ranks that exchange heads for sequence by all-to-all (DeepSpeed-Ulysses); "
        "inside a node. Context-parallel size becomes ulysses x ring degree. 'auto' with "
        "--context-parallel-size N: U x R = N chosen by usp_megatron.choose_degrees (the "
        "largest U that keeps the all-to-all in a node and U <= heads per TP rank, unless "
        "its cost model says otherwise).",
    )
    group.add_argument(
        "--usp-ring-degree",
        type=int,
        default=None,
        help="Ranks that pass key/value blocks around a ring (Ring attention). Default 1; "
        "with --usp-ulysses-degree auto, N / U (if given, it must agree).",
    )
    group.add_argument(
        "--usp-ring-impl",
        choices=LAYOUT_NAMES,
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
    group.add_argument(
        "--usp-gpus-per-node",
        type=int,
        default=None,
        help="GPUs of one node, for --usp-ulysses-degree auto (default: LOCAL_WORLD_SIZE, "
        "which torchrun sets).",
    )
    group.add_argument(
        "--usp-no-foreach-grad-norm",
        dest="usp_foreach_grad_norm",
        action="store_false",
        help="Keep megatron-core's own gradient-norm and clipping fallback (one host "
        "synchronisation per parameter tensor) where neither TransformerEngine nor apex is "
        "installed; by default the plugin runs it as fused torch._foreach ops (whatever the "
        "degrees; with either package megatron-core's fused kernels stay).",
    )
    return parser


def _degrees(args: argparse.Namespace) -> tuple[int | str, int | None]:
    """The two flags, checked: ``U`` may still be ``auto``, ``R`` ``None`` (not given)."""
    u = getattr(args, "usp_ulysses_degree", 1)
    r = getattr(args, "usp_ring_degree", 1)
    if u != AUTO:
        check_positive_int("--usp-ulysses-degree", u, "no all-to-all")
    if r is not None:
        check_positive_int("--usp-ring-degree", r, "no ring")
    return u, r


def usp_layout(args: argparse.Namespace) -> SequenceLayout:
    """The layout object the flags name (``--usp-ring-impl``) for their degrees: what every
    hook and the example hand down, resolved here (once: one object per name and degrees).
    Needs ``apply_usp_args`` to have resolved ``--usp-ulysses-degree auto``."""
    u, r = _degrees(args)
    if u == AUTO:
        raise ValueError("--usp-ulysses-degree auto is resolved by apply_usp_args: run it first")
    return get_layout(getattr(args, "usp_ring_impl", "zigzag"), u, r or 1)


def usp_enabled(args: argparse.Namespace) -> bool:
    """Whether the flags ask for USP; refuses degrees below 1 rather than reading them as off
    (a product test would turn ``U = 0, R = 4`` into plain data parallelism)."""
    u, r = _degrees(args)
    if u == AUTO:
        return getattr(args, "context_parallel_size", 1) > 1 or (r or 1) > 1
    return u > 1 or (r or 1) > 1


def _gpus_per_node(args: argparse.Namespace) -> int:
    flag = getattr(args, "usp_gpus_per_node", None)
    if flag is not None:
        check_positive_int("--usp-gpus-per-node", flag, "one GPU per node")
        return flag
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None or not local.isdigit() or int(local) < 1:
        raise ValueError(
            "--usp-ulysses-degree auto needs the GPUs per node (the all-to-all must stay inside "
            f"one): pass --usp-gpus-per-node, or launch with torchrun (LOCAL_WORLD_SIZE={local!r})"
        )
    return int(local)


def _kv_heads(args: argparse.Namespace) -> int:
    """Key/value heads of the model: ``--num-query-groups`` where GQA is on (Megatron-LM
    reads it only with ``--group-query-attention``), else one per query head."""
    groups = getattr(args, "num_query_groups", None)
    if getattr(args, "group_query_attention", True) and groups:
        return groups
    return args.num_attention_heads


def _choose_auto(args: argparse.Namespace) -> None:
    """Replace ``auto`` by the chosen ``U`` and ``R``; rank 0 says what and why."""
    cp, given_ring = getattr(args, "context_parallel_size", 1), args.usp_ring_degree
    check_positive_int("--context-parallel-size", cp, "no context parallelism")
    if cp == 1:
        if (given_ring or 1) > 1:
            raise ValueError(
                f"--usp-ulysses-degree auto chooses U x R for --context-parallel-size N; got "
                f"--usp-ring-degree {given_ring} without it: add --context-parallel-size N or "
                "give --usp-ulysses-degree explicitly"
            )
        args.usp_ulysses_degree, args.usp_ring_degree = 1, 1
        log_rank_0(args, "USP: --usp-ulysses-degree auto with context-parallel size 1: USP is off")
        return
    tp = getattr(args, "tensor_model_parallel_size", 1)
    heads = heads_per_tp_rank(args.num_attention_heads, tp)
    kv_heads = _kv_heads(args)
    if kv_heads % tp:
        raise ValueError(
            f"key/value heads (--num-query-groups) {kv_heads} must be divisible by the "
            f"tensor-parallel size {tp}"
        )
    gpus = _gpus_per_node(args)
    # Megatron orders ranks TP first, then CP: a ulysses group spans U * TP consecutive GPUs.
    cp_per_node = gpus // tp if gpus % tp == 0 else 1
    seq_len = getattr(args, "seq_length", None)
    model = CostModel()
    costs = degree_costs(cp, heads, kv_heads // tp, cp_per_node, seq_len, model)
    chosen = pick(costs, model)
    why = (
        f"U divides {cp} and the {cp_per_node} context-parallel ranks of a node ({gpus} per node "
        f"/ TP {tp}), U <= {heads} heads per TP rank ({kv_heads // tp} key/value)"
    )
    if given_ring is not None and given_ring != chosen.ring:
        raise ValueError(
            f"--usp-ring-degree {given_ring} disagrees with --usp-ulysses-degree auto, which "
            f"chose U={chosen.ulysses} x R={chosen.ring} for --context-parallel-size {cp} "
            f"({why}): drop --usp-ring-degree, or give both degrees explicitly"
        )
    fastest = min(cost.total_s for cost in costs)
    ranked = ", ".join(f"U{c.ulysses}xR{c.ring} {c.total_s / fastest:.2f}" for c in costs)
    basis = f"at {seq_len} tokens" if seq_len else "without a sequence length (head balance only)"
    log_rank_0(
        args,
        f"USP: --usp-ulysses-degree auto chose U{chosen.ulysses} x R{chosen.ring} for "
        f"context-parallel size {cp}. Candidates ({why}), modelled time vs the fastest "
        f"{basis}: {ranked}; the largest U within {model.preference_margin:.0%} of the fastest "
        "wins (docs/choosing_degrees.md)",
    )
    args.usp_ulysses_degree, args.usp_ring_degree = chosen.ulysses, chosen.ring


def log_rank_0(args: argparse.Namespace, line: str) -> None:
    """Print ``line`` on rank 0 (Megatron-LM's ``args.rank``, else ``RANK``) only."""
    rank = getattr(args, "rank", None)
    if (rank if rank is not None else int(os.environ.get("RANK", "0"))) == 0:
        print(line, flush=True)


def apply_usp_args(args: argparse.Namespace) -> argparse.Namespace:
    """Turn the USP degrees into Megatron's context-parallel settings (before validate_args):
    context-parallel size, hierarchical sizes and, unless typed, ``cp_comm_type``."""
    u, r = _degrees(args)
    if u == AUTO:
        _choose_auto(args)
    elif r is None:
        args.usp_ring_degree = 1
    enabled = usp_enabled(args)
    _apply_cp_comm_type(args, enabled)
    if not enabled:
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
    if _degrees(args)[0] == AUTO:
        raise ValueError("--usp-ulysses-degree auto is resolved by apply_usp_args: run it first")
    if not usp_enabled(args):
        return args
    u, r = args.usp_ulysses_degree, args.usp_ring_degree or 1
    check_context_parallel(
        u, r, args.context_parallel_size, getattr(args, "hierarchical_context_parallel_sizes", None)
    )
    check_heads(
        args.num_attention_heads,
        args.tensor_model_parallel_size,
        u,
        # Megatron-LM reads --num-query-groups only with --group-query-attention.
        getattr(args, "num_query_groups", None)
        if getattr(args, "group_query_attention", True)
        else None,
    )
    comm = getattr(args, "cp_comm_type", None)
    if isinstance(comm, MegatronDefault):
        raise ValueError("--cp-comm-type is resolved by apply_usp_args: run it first")
    for value in _cp_comm_types(comm):
        check_cp_comm_type(value, u, r)
    layout = usp_layout(args)
    layout.check_seq_len(args.seq_length)
    check_attention_options(
        attention_dropout=getattr(args, "attention_dropout", 0.0),
        multi_latent_attention=getattr(args, "multi_latent_attention", False),
        softmax_type=getattr(args, "softmax_type", "vanilla"),
        window_size=getattr(args, "window_size", None),
    )
    check_causal_window(getattr(args, "window_size", None))
    check_position_embedding(getattr(args, "position_embedding_type", "rope"), layout)
    refused = {
        "use_legacy_models": "--use-legacy-models (USP is a megatron-core module)",
        "hybrid_context_parallel": "--hybrid-context-parallel (its own context parallelism)",
        "experimental_attention_variant": "--experimental-attention-variant (own attention)",
        "heterogeneous_layers_config_path": "--heterogeneous-layers-config-path (its specs "
        "hard-code TransformerEngine attention)",
    }
    for name, flag in refused.items():
        if getattr(args, name, None):
            raise ValueError(f"USP does not compose with {flag}; drop it or drop --usp-* flags")
    return args
