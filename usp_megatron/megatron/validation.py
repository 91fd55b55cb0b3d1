"""Checks that a model and parallel configuration compose with USP, with errors that say why.

Shared by the core-attention module (checked when it is built), the spec builders and the
Megatron-LM flag validation, so every entry point refuses the same things in the same words.
How a refusal reaches the user of a distributed run lives here too: :class:`USPRefusal`
and :func:`exit_refused` (one line from one rank, exit 1 on every rank).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import NoReturn

from usp_megatron.checks import check_degrees, check_window
from usp_megatron.layout import SequenceLayout


class USPRefusal(ValueError):
    """Something the plugin refuses, said in one line: the Megatron-LM entry points (the
    patched script, through the excepthook ``install()`` sets, and the launcher) print it
    once and exit 1 on every rank instead of a traceback per rank.

    ``speaks``: whether this rank prints it. By default rank 0 (``RANK``), right where every
    rank refuses the same flags; a refusal only some ranks reach (one context-parallel
    group's batch) names the one of them that speaks.
    """

    def __init__(self, message: str, speaks: bool | None = None) -> None:
        super().__init__(message)
        self.speaks = os.environ.get("RANK", "0") == "0" if speaks is None else speaks


def exit_refused(message: str, grace_s: float = 30.0, speaks: bool | None = None) -> NoReturn:
    """Exit 1 with ``message`` printed by the rank that ``speaks`` (default: rank 0).

    Every rank refuses the same thing, so one line replaces a traceback per rank. The other
    ranks wait up to ``grace_s`` before exiting, quietly: torchrun ends all ranks as soon as
    one exits, which could otherwise kill the speaking rank before it has printed. Their
    SIGTERM then exits 1 too; the handler is put back afterwards (a caller that catches the
    SystemExit, e.g. a test, keeps its own).
    """
    if speaks is None:
        speaks = os.environ.get("RANK", "0") == "0"
    if speaks:
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(1)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        time.sleep(grace_s)
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise SystemExit(1)


def heads_per_tp_rank(num_attention_heads: int, tensor_parallel_size: int) -> int:
    if num_attention_heads % tensor_parallel_size:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} must be divisible by the "
            f"tensor-parallel size {tensor_parallel_size}"
        )
    return num_attention_heads // tensor_parallel_size


def check_heads(
    num_attention_heads: int,
    tensor_parallel_size: int,
    ulysses_degree: int,
    num_query_groups: int | None = None,
) -> None:
    """Query heads are split by TP first, then by the ulysses all-to-all.

    ``U`` need not divide a TP rank's heads (the all-to-all then splits them unevenly, at
    the cost ``HeadSplit.imbalance``) but may not exceed them. Key/value heads
    (``num_query_groups``) must divide the query heads and split over TP; beyond that they
    need no check: the attention sends each ulysses rank those its query heads read,
    replicated where ranks share one, never dropped.
    """
    per_rank = heads_per_tp_rank(num_attention_heads, tensor_parallel_size)
    groups = num_attention_heads if num_query_groups is None else num_query_groups
    if groups < 1 or num_attention_heads % groups:
        raise ValueError(
            f"num_query_groups={groups} (--num-query-groups) must divide "
            f"num_attention_heads={num_attention_heads}: every key/value head serves the "
            "same number of query heads"
        )
    if groups % tensor_parallel_size and tensor_parallel_size % groups:
        raise ValueError(
            f"num_query_groups={groups} (--num-query-groups) and the tensor-parallel size "
            f"{tensor_parallel_size} must divide one another"
        )
    if ulysses_degree > per_rank:
        raise ValueError(
            f"the ulysses degree {ulysses_degree} must be at most the attention heads per "
            f"tensor-parallel rank ({num_attention_heads} / TP {tensor_parallel_size} = "
            f"{per_rank}): every ulysses rank computes at least one head; lower U or TP"
        )


def check_attention_options(
    *,
    attention_dropout: float = 0.0,
    multi_latent_attention: bool = False,
    softmax_type: str = "vanilla",
    window_size: object = None,
) -> None:
    """Attention features the USP kernels do not have, and a well-formed sliding window."""
    if multi_latent_attention:
        raise ValueError(
            "multi-latent attention (--multi-latent-attention) does not compose with USP: its "
            "key/value heads are built by MLASelfAttention, which USP does not replace"
        )
    if attention_dropout:
        raise ValueError(
            f"USP attention has no attention-probability dropout; set attention_dropout "
            f"(--attention-dropout) to 0.0, got {attention_dropout}"
        )
    if softmax_type != "vanilla":
        raise ValueError(
            f"USP attention supports softmax_type='vanilla' only, got {softmax_type!r}"
        )
    check_window(window_size)


def check_causal_window(window_size: object, unbounded_right: bool = True) -> None:
    """A GPT is causal, so a sliding window's RIGHT above 0 would silently act as 0; so would
    -1 (unbounded), where ``unbounded_right`` is False. A malformed window is left to
    ``check_window``'s own message."""
    try:
        window = check_window(None if window_size is None else tuple(window_size))
    except (TypeError, ValueError):
        return
    if window is None:
        return
    left, right = window
    if right > 0 or (right == -1 and not unbounded_right):
        raise ValueError(
            f"--window-size {left} {right}: this GPT is causal (token i never sees a later "
            f"token), so RIGHT must be 0; {right} would silently act as 0: use --window-size "
            f"{left} 0"
        )


def check_position_embedding(position_embedding_type: str, layout: SequenceLayout) -> None:
    """Only RoPE (and position ids) get the plugin's own slice for stripe and basic."""
    if not layout.megatron_split and position_embedding_type in ("yarn", "mrope"):
        raise ValueError(
            f"position_embedding_type={position_embedding_type!r} is sliced by Megatron for "
            f"the zigzag layout only; use --usp-ring-impl zigzag, or 'rope' / "
            f"'learned_absolute' / 'none' with the {layout.name} layout"
        )


def check_packed_documents(
    layout: SequenceLayout,
    window_size: object,
    heads_per_tp_rank: int,
    ulysses_degree: int,
    what: str = "packed documents",
) -> None:
    """What USP attention refuses for packed documents (THD), said before a model is built:
    ``what`` names the flag that asks for them (e.g. ``--pack-documents``)."""
    if not layout.takes_documents:
        raise ValueError(
            f"{what} needs --usp-ring-impl zigzag, got {layout.name}: the context-parallel "
            f"split of packed documents is the zigzag of every document; drop --usp-ring-impl "
            f"or {what}"
        )
    try:
        window = check_window(None if window_size is None else tuple(window_size))
    except (TypeError, ValueError):
        window = None  # a malformed window is refused with its own message
    if window is not None:
        shown = " ".join(map(str, window_size))
        raise ValueError(
            f"--window-size {shown} with {what} is not supported: packed documents attend "
            "over their whole document; drop one of them"
        )
    if heads_per_tp_rank % ulysses_degree:
        cp = layout.cp_size
        divisors = [
            d for d in range(1, heads_per_tp_rank + 1) if heads_per_tp_rank % d == 0 and cp % d == 0
        ]
        raise ValueError(
            f"{what} needs the {heads_per_tp_rank} query heads of a tensor-parallel rank to "
            f"split evenly over --usp-ulysses-degree {ulysses_degree} (packed documents take "
            f"no uneven head split): use a ulysses degree among {divisors}, or drop {what}"
        )


def usp_cp_comm_type(ulysses_degree: int, ring_degree: int) -> str:
    """The ``cp_comm_type`` that names what USP does: ``a2a+p2p`` with both degrees above 1,
    ``a2a`` without a ring (``R == 1``), ``p2p`` without an all-to-all (``U == 1``)."""
    if ring_degree == 1:
        return "a2a"
    return "p2p" if ulysses_degree == 1 else "a2a+p2p"


def check_cp_comm_type(cp_comm_type: object, ulysses_degree: int, ring_degree: int) -> None:
    """Megatron's per-layer ``cp_comm_type`` must name what USP's degrees do: ``a2a+p2p``
    (or None) always, ``p2p`` with ``U == 1``, ``a2a`` with ``R == 1``; never ``all_gather``."""
    fits = {None: True, "a2a+p2p": True, "p2p": ulysses_degree == 1, "a2a": ring_degree == 1}
    if not fits.get(cp_comm_type, False):
        raise ValueError(
            f"cp_comm_type={cp_comm_type!r} does not describe USP with ulysses degree "
            f"{ulysses_degree} x ring degree {ring_degree}: the degrees decide the "
            f"communication ({usp_cp_comm_type(ulysses_degree, ring_degree)!r} here); leave "
            "cp_comm_type unset (or 'a2a+p2p')"
        )


def check_context_parallel(
    ulysses_degree: int,
    ring_degree: int,
    context_parallel_size: int,
    hierarchical_sizes: list[int] | None,
) -> None:
    """The context-parallel size Megatron was given must be exactly ``U * R`` as ``[U, R]``."""
    check_degrees(ulysses_degree, ring_degree)
    cp = ulysses_degree * ring_degree
    if context_parallel_size not in (1, cp):
        raise ValueError(
            f"--context-parallel-size {context_parallel_size} conflicts with --usp-ulysses-degree "
            f"{ulysses_degree} x --usp-ring-degree {ring_degree} = {cp}: drop "
            "--context-parallel-size (USP sets it) or make it equal U * R"
        )
    if hierarchical_sizes and list(hierarchical_sizes) != [ulysses_degree, ring_degree]:
        raise ValueError(
            f"--hierarchical-context-parallel-sizes {list(hierarchical_sizes)} conflicts with "
            f"USP's [U, R] = [{ulysses_degree}, {ring_degree}]: drop it (USP sets it)"
        )


def check_cp_comm_type_layers(values: list, num_layers: int | None) -> None:
    """A ``--cp-comm-type`` list is one value per layer (or one for all), as Megatron reads it."""
    if len(values) > 1 and num_layers is not None and len(values) != num_layers:
        raise ValueError(
            f"--cp-comm-type {' '.join(map(str, values))} gives {len(values)} values for "
            f"--num-layers {num_layers}: give one per layer or one for all (or drop "
            "--cp-comm-type: USP sets it)"
        )


def check_megatron_lm_seq_length(seq_length: int, ulysses_degree: int, ring_degree: int) -> None:
    """Megatron-LM cuts every sequence into ``2 x`` context-parallel-size chunks whatever the
    layout: its ``validate_args`` asserts it, naming ``--context-parallel-size``, which the
    user did not type under USP; said first, with the USP flags."""
    multiple = 2 * ulysses_degree * ring_degree
    if seq_length < 1 or seq_length % multiple:
        below = max(multiple, seq_length // multiple * multiple)
        raise ValueError(
            f"--seq-length {seq_length} must be a multiple of 2 x --usp-ulysses-degree "
            f"{ulysses_degree} x --usp-ring-degree {ring_degree} = {multiple} (Megatron-LM "
            f"cuts every sequence into 2 x U x R chunks): e.g. --seq-length {below} or "
            f"{below + multiple}"
        )


def check_document_masking(
    layout: SequenceLayout,
    window_size: object,
    heads_per_tp_rank: int,
    ulysses_degree: int,
    pipeline_parallel_size: int,
) -> None:
    """``--reset-attention-mask`` (with the data loader's mask) under USP: its documents are
    attended as packed documents, so what those refuse; and pipeline parallelism, whose
    stages exchange activations of a fixed sequence length while a packed micro-batch's
    length depends on its documents' padding."""
    what = "--reset-attention-mask"
    check_packed_documents(layout, window_size, heads_per_tp_rank, ulysses_degree, what)
    if pipeline_parallel_size > 1:
        raise ValueError(
            f"{what} with --pipeline-model-parallel-size {pipeline_parallel_size} is not "
            "supported under USP: its documents are packed, padded each to a multiple of "
            "2 x U x R, so a micro-batch's length varies and pipeline stages exchange fixed "
            "shapes; drop one of them"
        )
