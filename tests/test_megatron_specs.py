"""The spec builders: USP's core attention swapped into Megatron's layer and block specs,
and nothing else changed (one process)."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_layer_specs,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from usp_megatron import checks
from usp_megatron.megatron import get_gpt_layer_usp_spec, with_usp_attention
from usp_megatron.megatron.specs import USPCoreAttention, usp_core_attention


def _core_attentions(spec) -> list:
    layers = spec.layer_specs if hasattr(spec, "layer_specs") else [spec]
    return [layer.submodules.self_attention.submodules.core_attention for layer in layers]


def _by_value(node):
    """A spec as plain values: partials (megatron-core 0.19 builds MLPs as partials, which
    compare by identity) by function and arguments; the core attention left out."""
    if isinstance(node, SelfAttentionSubmodules):
        node = dataclasses.replace(node, core_attention="compared apart")
    if isinstance(node, functools.partial):
        return ("partial", _by_value(node.func), _by_value(node.args), _by_value(node.keywords))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        fields = dataclasses.fields(node)
        return type(node), {f.name: _by_value(getattr(node, f.name)) for f in fields}
    if isinstance(node, (list, tuple)):
        return [_by_value(item) for item in node]
    if isinstance(node, dict):
        return {key: _by_value(value) for key, value in node.items()}
    return node


def test_usp_spec_swaps_only_core_attention():
    options = dict(normalization="RMSNorm", qk_layernorm=True)
    local = get_gpt_layer_local_spec(**options)
    usp = get_gpt_layer_usp_spec(layout="stripe", backend="reference", **options)
    (core,) = _core_attentions(usp)
    assert core == USPCoreAttention(layout="stripe", backend="reference")
    assert _by_value(usp) == _by_value(local)  # the same modules and arguments elsewhere
    swapped = with_usp_attention(local, layout="stripe", backend="reference")
    assert _core_attentions(local) == [DotProductAttention]  # the original is untouched
    attn, local_attn = swapped.submodules.self_attention, local.submodules.self_attention
    assert attn.submodules.linear_qkv is local_attn.submodules.linear_qkv
    assert attn.submodules.q_layernorm is local_attn.submodules.q_layernorm
    assert swapped.submodules.mlp is local.submodules.mlp  # shared, not copied


def test_swap_reaches_attention_inside_partials():
    """megatron-core 0.19 writes submodules as partials; a core attention inside one is swapped."""
    local = get_gpt_layer_local_spec()
    attention = local.submodules.self_attention
    nested = functools.partial(dict, attention=attention, other=local.submodules.mlp)
    swapped = with_usp_attention([nested])[0]
    assert swapped.func is dict and swapped.keywords["other"] is local.submodules.mlp
    assert isinstance(swapped.keywords["attention"].submodules.core_attention, USPCoreAttention)
    untouched = functools.partial(dict, other=local.submodules.mlp)
    assert with_usp_attention(untouched) is untouched


def test_block_spec_with_moe_layers_is_swapped_everywhere():
    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=8,
                               num_moe_experts=4, moe_layer_freq=2)  # fmt: skip
    layers = get_gpt_decoder_layer_specs(config, use_transformer_engine=False)
    block = TransformerBlockSubmodules(layer_specs=layers, layer_norm=LocalSpecProvider.layer_norm)
    cores = _core_attentions(with_usp_attention(block))
    assert len(cores) == 4 and all(isinstance(core, USPCoreAttention) for core in cores)


def test_mla_spec_is_refused():
    with pytest.raises(ValueError, match="multi-latent"):
        get_gpt_layer_usp_spec(multi_latent_attention=True)
    with pytest.raises(ValueError, match="multi-latent"):
        with_usp_attention(get_gpt_layer_local_spec(multi_latent_attention=True))


def test_bad_layout_or_backend_in_spec():
    with pytest.raises(ValueError, match="layout must be one of"):
        get_gpt_layer_usp_spec(layout="spiral")
    with pytest.raises(ValueError, match="backend"):
        get_gpt_layer_usp_spec(backend="cuda_magic")


def test_old_ring_impl_keyword_warns_once_and_names_the_new_one(monkeypatch):
    monkeypatch.setattr(checks, "_RENAMES_SAID", set())
    with pytest.warns(FutureWarning, match="ring_impl= is now layout="):
        assert usp_core_attention(ring_impl="stripe") == USPCoreAttention(layout="stripe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not on every call
        assert usp_core_attention(ring_impl="basic") == USPCoreAttention(layout="basic")
    with pytest.raises(ValueError, match="layout='basic' and ring_impl='stripe' disagree"):
        usp_core_attention("basic", ring_impl="stripe")
