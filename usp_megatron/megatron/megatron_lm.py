"""Hooks that put USP into Megatron-LM's ``pretrain_gpt.py`` (tags ``core_v0.16.1`` and
``core_v0.19.0``).

Megatron-LM imports most of what USP changes by name at import time, so :func:`install`
must run before ``pretrain_gpt.py`` imports ``megatron.training`` (the patches in
``patches/`` call it at the top of the script; the ``launch`` module calls it before
running the script). It replaces, each in every place the supported tags look it up:

- ``validate_args`` (in ``megatron.training.arguments``, and in ``initialize`` where 0.16
  imported it by name): ``--usp-*`` become ``context_parallel_size = U * R`` and
  hierarchical sizes ``[U, R]`` before Megatron's own checks, and USP's checks run after;
- the ``core_attention()`` of the local and TransformerEngine spec providers, which every
  GPT spec builder (dense, MoE, MTP) asks for its core attention;
- ``get_batch_on_this_cp_rank`` (the batch split): in ``megatron.core.utils``, where 0.19's
  script imports it from, and in ``megatron.training.utils``, where 0.16's did;
- ``get_thd_batch_on_this_cp_rank`` in ``megatron.core.utils`` (the packed-documents
  split, which ``pretrain_gpt.py`` imports by name and which needs TransformerEngine);
- ``get_batch_on_this_tp_rank`` (0.16: ``megatron.training.utils``, 0.19:
  ``megatron.core.utils``): a batch with ``--reset-attention-mask``'s document mask comes
  back as packed documents (``document_mask``), which the script's own THD path then takes;
- ``forward_step_calc_loss`` of megatron-core's schedules: without
  ``--calculate-per-token-loss``, each rank's loss weighed by the loss tokens of its whole
  context-parallel group (``loss``);
- the ``RotaryEmbedding`` that ``GPTModel`` builds (the RoPE slice of stripe and basic);
- megatron-core's fallback multi-tensor ops of the optimizer step (gradient norm, clipping,
  main-weight copy), only where it found neither TransformerEngine nor apex: the fused
  ``torch._foreach`` ops of ``grad_norm.py`` instead.

Every hook reads the flags from Megatron-LM's own ``get_args()`` when it runs, and is a
no-op unless ``--usp-ulysses-degree`` or ``--usp-ring-degree`` is above 1; the optimizer
ops alone are on whatever the degrees, unless ``--usp-no-foreach-grad-norm``. ``install``
also sets an excepthook that prints the plugin's refusals (:class:`USPRefusal`) as one line
from one rank, every rank exiting 1, instead of a traceback per rank.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from megatron.core import parallel_state

from usp_megatron.megatron.arguments import (
    add_usp_args,
    apply_usp_args,
    log_rank_0,
    usp_enabled,
    usp_layout,
    validate_usp_args,
)
from usp_megatron.megatron.batch import (
    get_batch_on_this_usp_rank,
    get_thd_batch_on_this_usp_rank,
)
from usp_megatron.megatron.document_mask import pack_masked_documents
from usp_megatron.megatron.grad_norm import FallbackSite, fallback_sites
from usp_megatron.megatron.loss import balance_over_context_parallel
from usp_megatron.megatron.rope import USPRotaryEmbedding
from usp_megatron.megatron.specs import usp_core_attention
from usp_megatron.megatron.validation import (
    USPRefusal,
    check_document_masking,
    check_megatron_lm_seq_length,
    exit_refused,
    heads_per_tp_rank,
)

_MARK = "_usp_megatron_hook"


def _mark(fn: Callable) -> Callable:
    setattr(fn, _MARK, True)
    return fn


def _hooked(fn: Any) -> bool:
    return getattr(fn, _MARK, False)


class USPArgumentError(USPRefusal):
    """The plugin refused the ``--usp-*`` configuration: raised from the ``validate_args``
    hook, on every rank alike, so the entry points can tell it from every other error and
    print it once."""


def _refuse_as_usp(check: Callable, args: argparse.Namespace) -> None:
    try:
        check(args)
    except ValueError as error:
        raise USPArgumentError(str(error)) from error


def _check_seq_length(args: argparse.Namespace) -> None:
    """What Megatron-LM's own ``validate_args`` asserts of the sequence length for the
    context-parallel size USP set, refused first in USP's words."""
    if usp_enabled(args) and getattr(args, "seq_length", None) is not None:
        check_megatron_lm_seq_length(args.seq_length, args.usp_ulysses_degree, args.usp_ring_degree)


def document_masking(args: argparse.Namespace) -> bool:
    """Whether the batches carry ``--reset-attention-mask``'s document mask: only with the
    mask made in the data loader (Megatron-LM ignores the flag otherwise, one rank too)."""
    return bool(
        getattr(args, "reset_attention_mask", False)
        and getattr(args, "create_attention_mask_in_dataloader", False)
    )


def _check_document_masking(args: argparse.Namespace) -> None:
    """Document masking under USP runs as packed documents (``document_mask``): refuse what
    those cannot run; say once when the flag has no effect, as in Megatron-LM itself."""
    if not usp_enabled(args):
        return
    if document_masking(args):
        check_document_masking(
            usp_layout(args),
            getattr(args, "window_size", None),
            heads_per_tp_rank(args.num_attention_heads, args.tensor_model_parallel_size),
            args.usp_ulysses_degree,
            getattr(args, "pipeline_model_parallel_size", 1),
        )
    elif getattr(args, "reset_attention_mask", False):
        log_rank_0(
            args,
            "USP: --reset-attention-mask has no effect without the data loader's attention "
            "mask (--no-create-attention-mask-in-dataloader): Megatron-LM ignores it then, on "
            "one rank too, and attention is causal over the whole sequence; drop "
            "--no-create-attention-mask-in-dataloader to keep attention inside documents",
        )


def with_usp_args(extra_args_provider: Callable | None = None) -> Callable:
    """An ``extra_args_provider`` that adds the ``--usp-*`` flags, then the given one's."""
    if extra_args_provider is not None and _hooked(extra_args_provider):
        return extra_args_provider

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = add_usp_args(parser)
        return extra_args_provider(parser) if extra_args_provider is not None else parser

    return _mark(provider)


def wrap_validate_args(validate_args: Callable) -> Callable:
    """Megatron-LM's ``validate_args`` with USP applied before and checked after it."""
    if _hooked(validate_args):
        return validate_args

    @functools.wraps(validate_args)
    def hooked(args: argparse.Namespace, *rest: Any, **kwargs: Any) -> Any:
        _refuse_as_usp(apply_usp_args, args)
        _refuse_as_usp(_check_seq_length, args)
        result = validate_args(args, *rest, **kwargs)
        _refuse_as_usp(validate_usp_args, args)
        _refuse_as_usp(_check_document_masking, args)
        return result

    return _mark(hooked)


def wrap_parse_args(parse_args: Callable) -> Callable:
    """``parse_args`` whose ``extra_args_provider`` also adds the ``--usp-*`` flags."""
    if _hooked(parse_args):
        return parse_args

    @functools.wraps(parse_args)
    def hooked(extra_args_provider: Callable | None = None, *rest: Any, **kwargs: Any) -> Any:
        return parse_args(with_usp_args(extra_args_provider), *rest, **kwargs)

    return _mark(hooked)


def wrap_core_attention(core_attention: Callable, get_args: Callable) -> Callable:
    """A spec provider's ``core_attention`` method that answers USP when the flags ask."""
    if _hooked(core_attention):
        return core_attention

    @functools.wraps(core_attention)
    def hooked(self: Any) -> Any:
        args = get_args()
        if not usp_enabled(args):
            return core_attention(self)
        # The hooks also build the RoPE of the layout (wrap_rotary_embedding).
        return usp_core_attention(
            usp_layout(args), args.usp_attn_backend, rope_sliced_for_layout=True
        )

    return _mark(hooked)


def wrap_batch_split(get_batch_on_this_cp_rank: Callable, get_args: Callable) -> Callable:
    """Megatron's context-parallel batch split, or USP's for the layout in the flags."""
    if _hooked(get_batch_on_this_cp_rank):
        return get_batch_on_this_cp_rank

    @functools.wraps(get_batch_on_this_cp_rank)
    def hooked(batch: dict, *rest: Any, **kwargs: Any) -> dict:
        args = get_args()
        if not usp_enabled(args):
            return get_batch_on_this_cp_rank(batch, *rest, **kwargs)
        return get_batch_on_this_usp_rank(batch, layout=usp_layout(args))

    return _mark(hooked)


def wrap_thd_batch_split(get_thd_batch_on_this_cp_rank: Callable, get_args: Callable) -> Callable:
    """Megatron's packed-documents (THD) batch split, or USP's: the same indices, without
    TransformerEngine, and THD is zigzag's (stripe and basic are refused there)."""
    if _hooked(get_thd_batch_on_this_cp_rank):
        return get_thd_batch_on_this_cp_rank

    @functools.wraps(get_thd_batch_on_this_cp_rank)
    def hooked(
        batch: dict, cu_seqlens: Any, cu_seqlens_padded: Any, max_seqlen: Any, *rest: Any,
        **kwargs: Any,
    ) -> tuple:  # fmt: skip
        args = get_args()
        if not usp_enabled(args):
            return get_thd_batch_on_this_cp_rank(
                batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *rest, **kwargs
            )
        return get_thd_batch_on_this_usp_rank(
            batch, cu_seqlens, cu_seqlens_padded, max_seqlen, layout=usp_layout(args)
        )

    return _mark(hooked)


def wrap_tp_batch(get_batch_on_this_tp_rank: Callable, get_args: Callable) -> Callable:
    """Megatron-LM's TP-rank batch getter; a batch with ``--reset-attention-mask``'s document
    mask comes back as packed documents (each padded to a multiple of ``2 x C``, times the
    TP size with sequence parallelism: every rank's share splits over TP)."""
    if _hooked(get_batch_on_this_tp_rank):
        return get_batch_on_this_tp_rank

    @functools.wraps(get_batch_on_this_tp_rank)
    def hooked(*a: Any, **kwargs: Any) -> dict:
        batch = get_batch_on_this_tp_rank(*a, **kwargs)
        args = get_args()
        if not (usp_enabled(args) and document_masking(args)):
            return batch
        if batch.get("attention_mask") is None or batch.get("tokens") is None:
            return batch
        multiple = 2 * args.context_parallel_size
        if getattr(args, "sequence_parallel", False):
            multiple *= args.tensor_model_parallel_size
        return pack_masked_documents(batch, multiple)

    return _mark(hooked)


def wrap_loss_calculation(forward_step_calc_loss: Callable, get_args: Callable) -> Callable:
    """megatron-core's ``forward_step_calc_loss`` with, under USP and without
    ``--calculate-per-token-loss``, the loss weighed by its context-parallel group's tokens."""
    if _hooked(forward_step_calc_loss):
        return forward_step_calc_loss
    signature = inspect.signature(forward_step_calc_loss)

    @functools.wraps(forward_step_calc_loss)
    def hooked(*a: Any, **kwargs: Any) -> Any:
        if not usp_enabled(get_args()):
            return forward_step_calc_loss(*a, **kwargs)
        bound = signature.bind(*a, **kwargs)
        loss_func, config = bound.arguments["loss_func"], bound.arguments["config"]
        if loss_func is not None and not config.calculate_per_token_loss:
            cp_group = parallel_state.get_context_parallel_group()
            bound.arguments["loss_func"] = balance_over_context_parallel(loss_func, cp_group)
        return forward_step_calc_loss(*bound.args, **bound.kwargs)

    return _mark(hooked)


def wrap_excepthook(excepthook: Callable) -> Callable:
    """``sys.excepthook`` that says a :class:`USPRefusal` in one line from one rank and exits
    1 (every rank), and hands every other error to ``excepthook``."""
    if _hooked(excepthook):
        return excepthook

    def hook(kind: type, error: BaseException, traceback: TracebackType | None) -> None:
        if isinstance(error, USPRefusal):
            exit_refused(f"usp_megatron: {error}", speaks=error.speaks)
        excepthook(kind, error, traceback)

    return _mark(hook)


def wrap_rotary_embedding(rotary_embedding: type, get_args: Callable) -> Callable:
    """What ``GPTModel`` calls to build its RoPE: USP's slice for stripe and basic."""
    if _hooked(rotary_embedding):
        return rotary_embedding

    def build(*a: Any, **kwargs: Any) -> Any:
        args = get_args()
        if usp_enabled(args) and not usp_layout(args).megatron_split:
            return USPRotaryEmbedding(*a, layout=usp_layout(args), **kwargs)
        return rotary_embedding(*a, **kwargs)

    return _mark(build)


def wrap_multi_tensor_op(site: FallbackSite, get_args: Callable) -> Callable:
    """Megatron-core's fallback op at ``site``, run as the fused foreach op unless
    ``--usp-no-foreach-grad-norm``."""
    current = getattr(site.module, site.name)
    if _hooked(current):
        return current

    @functools.wraps(site.megatron_op)
    def hooked(*op_args: Any, **kwargs: Any) -> Any:
        foreach = getattr(get_args(), "usp_foreach_grad_norm", True)
        return (site.foreach_op if foreach else site.megatron_op)(*op_args, **kwargs)

    return _mark(hooked)


SUPPORTED_TAGS = ("core_v0.16.1", "core_v0.19.0")


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"usp_megatron.megatron.megatron_lm needs Megatron-LM's {name} (put a Megatron-LM "
            f"checkout of tag {' or '.join(SUPPORTED_TAGS)} on PYTHONPATH): {error}"
        ) from error


def _replace(modules: list[Any], name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Wrap ``name`` in each module that has it; at least one must (else the tag is unknown)."""
    holders = [module for module in modules if hasattr(module, name)]
    if not holders:
        raise ImportError(
            f"none of {[module.__name__ for module in modules]} has {name}: this Megatron-LM "
            f"is not one of {SUPPORTED_TAGS}"
        )
    for module in holders:
        setattr(module, name, wrap(getattr(module, name)))


def install(add_flags: bool = False) -> None:
    """Hook USP into Megatron-LM; ``add_flags`` also adds ``--usp-*`` to its parser (for
    scripts whose ``extra_args_provider`` does not). Idempotent."""
    arguments = _module("megatron.training.arguments")
    initialize = _module("megatron.training.initialize")
    training_utils = _module("megatron.training.utils")
    core_utils = _module("megatron.core.utils")
    schedules = _module("megatron.core.pipeline_parallel.schedules")
    global_vars = _module("megatron.training.global_vars")
    gpt_model = _module("megatron.core.models.gpt.gpt_model")
    backends = _module("megatron.core.models.backends")
    get_args = global_vars.get_args

    # 0.16: initialize_megatron calls the names it imported; 0.19: parse_and_validate_args
    # calls arguments' own.
    _replace([arguments, initialize], "validate_args", wrap_validate_args)
    if add_flags:
        _replace([arguments, initialize], "parse_args", wrap_parse_args)
    providers = [backends.LocalSpecProvider]
    try:
        te_provider = importlib.import_module(
            "megatron.core.extensions.transformer_engine_spec_provider"
        )
        providers.append(te_provider.TESpecProvider)
    except ImportError:
        pass  # TransformerEngine is optional
    for provider in providers:
        provider.core_attention = wrap_core_attention(provider.core_attention, get_args)
    _replace(
        [core_utils, training_utils],
        "get_batch_on_this_cp_rank",
        lambda split: wrap_batch_split(split, get_args),
    )
    _replace(
        [core_utils, training_utils],
        "get_batch_on_this_tp_rank",
        lambda getter: wrap_tp_batch(getter, get_args),
    )
    _replace(
        [schedules],
        "forward_step_calc_loss",
        lambda calc: wrap_loss_calculation(calc, get_args),
    )
    if hasattr(core_utils, "get_thd_batch_on_this_cp_rank"):
        core_utils.get_thd_batch_on_this_cp_rank = wrap_thd_batch_split(
            core_utils.get_thd_batch_on_this_cp_rank, get_args
        )
    gpt_model.RotaryEmbedding = wrap_rotary_embedding(gpt_model.RotaryEmbedding, get_args)
    for site in fallback_sites():
        setattr(site.module, site.name, wrap_multi_tensor_op(site, get_args))
    sys.excepthook = wrap_excepthook(sys.excepthook)
