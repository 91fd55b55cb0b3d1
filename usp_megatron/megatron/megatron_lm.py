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
- the ``RotaryEmbedding`` that ``GPTModel`` builds (the RoPE slice of stripe and basic);
- megatron-core's fallback multi-tensor ops of the optimizer step (gradient norm, clipping,
  main-weight copy), only where it found neither TransformerEngine nor apex: the fused
  ``torch._foreach`` ops of ``grad_norm.py`` instead.

Every hook reads the flags from Megatron-LM's own ``get_args()`` when it runs, and is a
no-op unless ``--usp-ulysses-degree`` or ``--usp-ring-degree`` is above 1; the optimizer
ops alone are on whatever the degrees, unless ``--usp-no-foreach-grad-norm``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Callable
from typing import Any

from usp_megatron.megatron.arguments import (
    add_usp_args,
    apply_usp_args,
    usp_enabled,
    usp_layout,
    validate_usp_args,
)
from usp_megatron.megatron.batch import (
    get_batch_on_this_usp_rank,
    get_thd_batch_on_this_usp_rank,
)
from usp_megatron.megatron.grad_norm import FallbackSite, fallback_sites
from usp_megatron.megatron.rope import USPRotaryEmbedding
from usp_megatron.megatron.specs import usp_core_attention

_MARK = "_usp_megatron_hook"


def _mark(fn: Callable) -> Callable:
    setattr(fn, _MARK, True)
    return fn


def _hooked(fn: Any) -> bool:
    return getattr(fn, _MARK, False)


class USPArgumentError(ValueError):
    """The plugin refused the ``--usp-*`` configuration: raised from the ``validate_args``
    hook, so the launcher can tell it from every other error and print it once."""


def _refuse_as_usp(check: Callable, args: argparse.Namespace) -> None:
    try:
        check(args)
    except ValueError as error:
        raise USPArgumentError(str(error)) from error


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
        result = validate_args(args, *rest, **kwargs)
        _refuse_as_usp(validate_usp_args, args)
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
    if hasattr(core_utils, "get_thd_batch_on_this_cp_rank"):
        core_utils.get_thd_batch_on_this_cp_rank = wrap_thd_batch_split(
            core_utils.get_thd_batch_on_this_cp_rank, get_args
        )
    gpt_model.RotaryEmbedding = wrap_rotary_embedding(gpt_model.RotaryEmbedding, get_args)
    for site in fallback_sites():
        setattr(site.module, site.name, wrap_multi_tensor_op(site, get_args))
