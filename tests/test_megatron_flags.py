"""Flags, validation errors, spec rewriting and the Megatron-LM hook wrappers (one process)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
from pathlib import Path

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

from usp_megatron.megatron import (
    USPAttention,
    add_usp_args,
    apply_usp_args,
    get_gpt_layer_usp_spec,
    validate_usp_args,
    with_usp_attention,
)
from usp_megatron.megatron.megatron_lm import (
    with_usp_args,
    wrap_core_attention,
    wrap_parse_args,
    wrap_validate_args,
)

PATCHES = Path(__file__).parents[1] / "patches"


def parse(*flags: str, **megatron_args) -> argparse.Namespace:
    """USP flags parsed, plus the Megatron-LM arguments validation reads."""
    args = add_usp_args(argparse.ArgumentParser()).parse_args(list(flags))
    defaults = dict(
        context_parallel_size=1,
        hierarchical_context_parallel_sizes=None,
        num_attention_heads=16,
        tensor_model_parallel_size=1,
        seq_length=1024,
        attention_dropout=0.0,
        position_embedding_type="rope",
    )
    vars(args).update(defaults | megatron_args)
    return args


def test_flags_set_context_parallel_layout():
    args = apply_usp_args(parse("--usp-ulysses-degree", "4", "--usp-ring-degree", "2"))
    assert args.context_parallel_size == 8
    assert args.hierarchical_context_parallel_sizes == [4, 2]
    assert (args.usp_ring_impl, args.usp_attn_backend) == ("zigzag", "auto")
    validate_usp_args(args)


def test_flags_off_leave_megatron_alone():
    args = apply_usp_args(parse(context_parallel_size=4))
    assert args.context_parallel_size == 4 and args.hierarchical_context_parallel_sizes is None
    validate_usp_args(parse(num_attention_heads=3, attention_dropout=0.1))


def test_unknown_ring_impl_is_an_argparse_error():
    with pytest.raises(SystemExit):
        parse("--usp-ring-impl", "spiral")


U4R2 = ("--usp-ulysses-degree", "4", "--usp-ring-degree", "2")


@pytest.mark.parametrize(
    "flags, megatron_args, message",
    [
        (U4R2, dict(context_parallel_size=4), "--context-parallel-size 4 conflicts"),
        (U4R2, dict(hierarchical_context_parallel_sizes=[2, 4]), "[2, 4] conflicts"),
        (U4R2, dict(num_attention_heads=12, tensor_model_parallel_size=2), "(12 / TP 2 = 6)"),
        (U4R2, dict(num_attention_heads=12, tensor_model_parallel_size=8), "divisible by the"),
        (U4R2, dict(seq_length=1000), "multiple of 2 * U * R = 16"),
        (U4R2 + ("--usp-ring-impl", "stripe"), dict(seq_length=1004), "multiple of U * R = 8"),
        (U4R2, dict(multi_latent_attention=True), "multi-latent attention"),
        (U4R2, dict(attention_dropout=0.1), "--attention-dropout"),
        (U4R2, dict(window_size=(128, 0)), "sliding window"),
        (U4R2 + ("--usp-ring-impl", "basic"), dict(position_embedding_type="yarn"), "'yarn'"),
        (U4R2, dict(use_legacy_models=True), "--use-legacy-models"),
        (U4R2, dict(reset_attention_mask=True), "--reset-attention-mask"),
        (U4R2, dict(experimental_attention_variant="dsa"), "--experimental-attention-variant"),
    ],
)
def test_combinations_usp_cannot_run_are_refused(flags, megatron_args, message):
    args = parse(*flags, **megatron_args)
    with pytest.raises(ValueError) as error:
        validate_usp_args(apply_usp_args(args))
    assert message in str(error.value)


def test_stripe_accepts_lengths_zigzag_refuses():
    validate_usp_args(apply_usp_args(parse(*U4R2, "--usp-ring-impl", "stripe", seq_length=1032)))
    with pytest.raises(ValueError):
        validate_usp_args(apply_usp_args(parse(*U4R2, seq_length=1032)))


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
    usp = get_gpt_layer_usp_spec(ring_impl="stripe", backend="reference", **options)
    (core,) = _core_attentions(usp)
    assert isinstance(core, functools.partial) and core.func is USPAttention
    assert core.keywords == {"ring_impl": "stripe", "backend": "reference"}
    assert _by_value(usp) == _by_value(local)  # the same modules and arguments elsewhere
    swapped = with_usp_attention(local, ring_impl="stripe", backend="reference")
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
    assert swapped.keywords["attention"].submodules.core_attention.func is USPAttention
    untouched = functools.partial(dict, other=local.submodules.mlp)
    assert with_usp_attention(untouched) is untouched


def test_block_spec_with_moe_layers_is_swapped_everywhere():
    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=8,
                               num_moe_experts=4, moe_layer_freq=2)  # fmt: skip
    layers = get_gpt_decoder_layer_specs(config, use_transformer_engine=False)
    block = TransformerBlockSubmodules(layer_specs=layers, layer_norm=LocalSpecProvider.layer_norm)
    cores = _core_attentions(with_usp_attention(block))
    assert len(cores) == 4 and all(core.func is USPAttention for core in cores)


def test_mla_spec_is_refused():
    with pytest.raises(ValueError, match="multi-latent"):
        get_gpt_layer_usp_spec(multi_latent_attention=True)
    with pytest.raises(ValueError, match="multi-latent"):
        with_usp_attention(get_gpt_layer_local_spec(multi_latent_attention=True))


def test_bad_ring_impl_or_backend_in_spec():
    with pytest.raises(ValueError, match="ring_impl"):
        get_gpt_layer_usp_spec(ring_impl="spiral")
    with pytest.raises(ValueError, match="backend"):
        get_gpt_layer_usp_spec(backend="cuda_magic")


def test_validate_args_hook_applies_before_and_checks_after():
    seen = {}

    def megatron_validate_args(args, defaults=None):  # Megatron-LM's signature, less its {}
        seen["cp"] = args.context_parallel_size
        seen["hcp"] = args.hierarchical_context_parallel_sizes
        return args

    hooked = wrap_validate_args(megatron_validate_args)
    assert wrap_validate_args(hooked) is hooked  # idempotent
    hooked(parse("--usp-ulysses-degree", "2", "--usp-ring-degree", "2"), {})
    assert seen == {"cp": 4, "hcp": [2, 2]}
    with pytest.raises(ValueError, match="divisible by the ulysses degree"):
        hooked(parse("--usp-ulysses-degree", "3", num_attention_heads=16))


def test_flags_hook_chains_extra_args_providers_once():
    calls = []

    def modelopt_args(parser):
        calls.append("modelopt")
        parser.add_argument("--modelopt-flag", type=int, default=0)
        return parser

    provider = with_usp_args(modelopt_args)
    assert with_usp_args(provider) is provider
    parser = provider(argparse.ArgumentParser())
    args = parser.parse_args(["--usp-ring-degree", "2", "--modelopt-flag", "3"])
    assert (args.usp_ring_degree, args.modelopt_flag, calls) == (2, 3, ["modelopt"])

    def megatron_parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return extra_args_provider(argparse.ArgumentParser()).parse_args(["--usp-ring-degree", "4"])

    # The launcher's parse_args hook adds the flags once, also to a patched script's provider.
    assert wrap_parse_args(megatron_parse_args)(None).usp_ring_degree == 4
    assert wrap_parse_args(megatron_parse_args)(provider).usp_ring_degree == 4


def test_spec_provider_hook_answers_usp_only_when_enabled():
    args = parse()
    hooked = wrap_core_attention(LocalSpecProvider.core_attention, lambda: args)
    assert hooked(LocalSpecProvider()) is DotProductAttention
    args.usp_ulysses_degree, args.usp_ring_impl = 2, "basic"
    core = hooked(LocalSpecProvider())
    assert core.func is USPAttention and core.keywords["ring_impl"] == "basic"


def _megatron_lm_training(tag: str, args: argparse.Namespace) -> dict[str, types.ModuleType]:
    """Megatron-LM's ``megatron.training`` modules as ``tag`` lays out what the hooks replace."""
    from megatron.core import utils as core_utils

    def validate_args(args, defaults={}):  # noqa: B006 (Megatron-LM's signature)
        return args

    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return extra_args_provider(argparse.ArgumentParser()).parse_args([])

    modules = {name: types.ModuleType(f"megatron.training.{name}")
               for name in ("arguments", "initialize", "utils", "global_vars")}  # fmt: skip
    modules["arguments"].validate_args = validate_args
    modules["arguments"].parse_args = parse_args
    modules["global_vars"].get_args = lambda: args
    if tag == "core_v0.16.1":  # imported by name where 0.19 no longer does
        modules["initialize"].validate_args = validate_args
        modules["initialize"].parse_args = parse_args
        modules["utils"].get_batch_on_this_cp_rank = core_utils.get_batch_on_this_cp_rank
    return {f"megatron.training.{name}": module for name, module in modules.items()}


@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_install_hooks_every_place_each_tag_looks(monkeypatch, tag):
    from megatron.core import utils as core_utils
    from megatron.core.models.gpt import gpt_model

    from usp_megatron.megatron.megatron_lm import install

    args = parse()
    training = _megatron_lm_training(tag, args)
    for name, module in training.items():
        monkeypatch.setitem(sys.modules, name, module)
    replaced = [(LocalSpecProvider, "core_attention"), (core_utils, "get_batch_on_this_cp_rank"),
                (gpt_model, "RotaryEmbedding")]  # fmt: skip
    try:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        replaced.append((TESpecProvider, "core_attention"))
    except ImportError:
        pass
    for owner, name in replaced:  # restored after the test
        monkeypatch.setattr(owner, name, getattr(owner, name))
    install(add_flags=True)
    install(add_flags=True)  # idempotent
    hooked = [getattr(owner, name) for owner, name in replaced] + [
        getattr(module, name)
        for module in training.values()
        for name in ("validate_args", "parse_args", "get_batch_on_this_cp_rank")
        if hasattr(module, name)
    ]
    assert len(hooked) == len(replaced) + (5 if tag == "core_v0.16.1" else 2)
    assert all(getattr(fn, "_usp_megatron_hook", False) for fn in hooked)
    parsed = training["megatron.training.arguments"].parse_args(None)
    assert parsed.usp_ring_degree == 1  # the launcher's flags reach 0.19's parse_and_validate_args


@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_patch_installs_hooks_and_flags(tag):
    text = (PATCHES / f"megatron-lm-{tag}-pretrain_gpt.patch").read_text()
    added = [line[1:].strip() for line in text.splitlines() if line.startswith("+") and
             not line.startswith("+++")]  # fmt: skip
    assert "usp_megatron_lm.install()  # imports below pick them up" in added
    assert "extra_args_provider=usp_megatron_lm.with_usp_args(" in added
    assert "--- a/pretrain_gpt.py" in text and "+++ b/pretrain_gpt.py" in text
    # The hook line sits above the imports it has to precede.
    assert text.index("usp_megatron_lm.install()") < text.index(" from gpt_builders import")


def test_launcher_refuses_bad_usage_and_names_what_is_missing(tmp_path):
    from usp_megatron.megatron import launch

    with pytest.raises(SystemExit, match="usage"):
        launch.main(["--usp-ring-degree", "2"])
    with pytest.raises(SystemExit, match="no such script"):
        launch.main([str(tmp_path / "pretrain_gpt.py")])
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("raise SystemExit('ran')\n")
    try:
        import megatron.training  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Megatron-LM"):
            launch.main([str(script)])
