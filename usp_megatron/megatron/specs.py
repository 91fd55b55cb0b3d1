"""Layer specs with USP core attention: one slot of a Megatron spec changes, nothing else.

``with_usp_attention`` rewrites any GPT spec (a layer ``ModuleSpec``, a
``TransformerBlockSubmodules`` of dense and MoE layers, local or TransformerEngine modules,
ModuleSpecs or partials as megatron-core 0.16 to 0.19 write them) so that every
self-attention's ``core_attention`` is :class:`USPAttention`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from usp_megatron.checks import renamed_keyword
from usp_megatron.kernels import check_backend
from usp_megatron.layout import LayoutArg, check_layout_name
from usp_megatron.megatron.core_attention import USPAttention
from usp_megatron.megatron.validation import check_attention_options


@dataclasses.dataclass(frozen=True)
class USPCoreAttention:
    """What goes in ``SelfAttentionSubmodules.core_attention``. Megatron calls that slot
    directly with the ``DotProductAttention`` arguments (a ``ModuleSpec`` would not be
    built there), so this is a callable that adds USP's own settings; being a dataclass,
    two specs with the same settings compare equal. ``layout``: a name, or the layout
    object itself where the degrees are known when the spec is built."""

    layout: LayoutArg = "zigzag"
    backend: str = "auto"
    rope_sliced_for_layout: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> USPAttention:
        settings = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return USPAttention(*args, **kwargs, **settings)


def usp_core_attention(
    layout: LayoutArg = "zigzag",
    backend: str = "auto",
    rope_sliced_for_layout: bool = False,
    *,
    ring_impl: str | None = None,
) -> USPCoreAttention:
    """The ``core_attention`` slot for USP (see :class:`USPCoreAttention`)."""
    layout = renamed_keyword(
        "usp_core_attention", "ring_impl", "layout", ring_impl, layout, "zigzag"
    )
    if isinstance(layout, str):
        check_layout_name(layout)
    check_backend(backend)
    return USPCoreAttention(layout, backend, rope_sliced_for_layout)


def _same(new: Any, old: Any) -> bool:
    return all(a is b for a, b in zip(new, old, strict=True))


def _swap(node: Any, core_attention: USPCoreAttention) -> Any:
    """``node`` with every self-attention core swapped; parts with none inside are returned
    as they are (the same objects), so the copy shares everything but the swapped slots."""
    if isinstance(node, MLASelfAttentionSubmodules):
        check_attention_options(multi_latent_attention=True)
    if isinstance(node, SelfAttentionSubmodules):
        return dataclasses.replace(node, core_attention=core_attention)
    if isinstance(node, list):
        items = [_swap(item, core_attention) for item in node]
        return node if _same(items, node) else items
    if isinstance(node, functools.partial):
        # megatron-core >= 0.19 writes some submodules as partial(Module..., submodules=...).
        args = [_swap(arg, core_attention) for arg in node.args]
        keywords = {key: _swap(value, core_attention) for key, value in node.keywords.items()}
        if _same(args, node.args) and _same(keywords.values(), node.keywords.values()):
            return node
        return functools.partial(node.func, *args, **keywords)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        names = [f.name for f in dataclasses.fields(node) if f.init]
        changes = {name: _swap(getattr(node, name), core_attention) for name in names}
        if _same(changes.values(), [getattr(node, name) for name in names]):
            return node
        return dataclasses.replace(node, **changes)
    return node


def with_usp_attention(
    spec: Any, layout: LayoutArg = "zigzag", backend: str = "auto", *, ring_impl: str | None = None
) -> Any:
    """A copy of ``spec`` whose self-attention core is USP; the original is not changed."""
    layout = renamed_keyword(
        "with_usp_attention", "ring_impl", "layout", ring_impl, layout, "zigzag"
    )
    return _swap(spec, usp_core_attention(layout, backend))


def get_gpt_layer_usp_spec(
    layout: LayoutArg = "zigzag",
    backend: str = "auto",
    *,
    ring_impl: str | None = None,
    **local_spec_options: Any,
) -> ModuleSpec:
    """``get_gpt_layer_local_spec(**local_spec_options)`` with USP core attention."""
    layout = renamed_keyword(
        "get_gpt_layer_usp_spec", "ring_impl", "layout", ring_impl, layout, "zigzag"
    )
    if local_spec_options.get("multi_latent_attention"):
        check_attention_options(multi_latent_attention=True)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(**local_spec_options)
    return with_usp_attention(spec, layout, backend)


def get_gpt_layer_usp_te_spec(
    layout: LayoutArg = "zigzag",
    backend: str = "auto",
    *,
    ring_impl: str | None = None,
    **te_spec_options: Any,
) -> ModuleSpec:
    """``get_gpt_layer_with_transformer_engine_spec(...)`` with USP core attention.

    TransformerEngine's linear and norm layers stay; only the core attention changes.
    """
    if not gpt_layer_specs.HAVE_TE:
        raise ImportError(
            "get_gpt_layer_usp_te_spec needs transformer_engine; use get_gpt_layer_usp_spec "
            "(megatron-core's own layers) without it"
        )
    layout = renamed_keyword(
        "get_gpt_layer_usp_te_spec", "ring_impl", "layout", ring_impl, layout, "zigzag"
    )
    if te_spec_options.get("multi_latent_attention"):
        check_attention_options(multi_latent_attention=True)
    spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**te_spec_options)
    return with_usp_attention(spec, layout, backend)
