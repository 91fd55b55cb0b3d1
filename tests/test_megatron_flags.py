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
    add_usp_args,
    apply_usp_args,
    get_gpt_layer_usp_spec,
    validate_usp_args,
    with_usp_attention,
)
from usp_megatron.megatron.arguments import usp_enabled
from usp_megatron.megatron.core_attention import describe_head_split
from usp_megatron.megatron.megatron_lm import (
    with_usp_args,
    wrap_core_attention,
    wrap_parse_args,
    wrap_validate_args,
)
from usp_megatron.megatron.specs import USPCoreAttention
from usp_megatron.megatron.validation import check_cp_comm_type

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


@pytest.mark.parametrize(
    "ulysses, ring, message",
    [
        ("0", "4", "--usp-ulysses-degree must be an integer >= 1 (1: no all-to-all), got 0"),
        ("-2", "1", "--usp-ulysses-degree must be an integer >= 1 (1: no all-to-all), got -2"),
        ("4", "0", "--usp-ring-degree must be an integer >= 1 (1: no ring), got 0"),
        ("1", "-1", "--usp-ring-degree must be an integer >= 1 (1: no ring), got -1"),
    ],
)
def test_degrees_below_one_are_refused_not_read_as_off(ulysses, ring, message):
    # U = 0, R = 4 once trained plain data parallelism: its product is not above 1.
    args = parse("--usp-ulysses-degree", ulysses, "--usp-ring-degree", ring)
    for step in (usp_enabled, apply_usp_args, validate_usp_args):
        with pytest.raises(ValueError) as error:
            step(args)
        assert str(error.value) == message
    assert args.context_parallel_size == 1


AUTO8 = ("--usp-ulysses-degree", "auto", "--usp-gpus-per-node", "8")


def test_auto_chooses_degrees_for_the_context_parallel_size(capsys):
    args = apply_usp_args(parse(*AUTO8, context_parallel_size=8, seq_length=32768, rank=0))
    assert (args.usp_ulysses_degree, args.usp_ring_degree) == (8, 1)
    assert args.context_parallel_size == 8 and args.hierarchical_context_parallel_sizes == [8, 1]
    validate_usp_args(args)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("USP: --usp-ulysses-degree auto chose U8 x R1 for context-parallel")
    assert "U <= 16 heads per TP rank (16 key/value)" in line and "at 32768 tokens: U1xR8" in line
    apply_usp_args(args)  # once chosen, applying again changes nothing and says nothing
    assert args.hierarchical_context_parallel_sizes == [8, 1] and not capsys.readouterr().out


def test_auto_reads_heads_per_tp_rank_and_gpus_per_node_from_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    gqa = dict(num_attention_heads=32, num_query_groups=8, group_query_attention=True)
    flags = ("--usp-ulysses-degree", "auto")
    args = apply_usp_args(parse(*flags, context_parallel_size=8, tensor_model_parallel_size=2,
                                seq_length=131072, rank=1, **gqa))  # fmt: skip
    # TP 2 leaves 4 context-parallel ranks per node of 8: U4 x R2 (16 / 4 heads per rank).
    assert (args.usp_ulysses_degree, args.usp_ring_degree) == (4, 2)
    assert not capsys.readouterr().out  # rank 1 stays quiet
    validate_usp_args(args)
    # Megatron-LM reads --num-query-groups (default 1) only with --group-query-attention.
    mha = dict(num_attention_heads=64, num_query_groups=1, group_query_attention=False)
    args = apply_usp_args(parse(*flags, context_parallel_size=8, tensor_model_parallel_size=8,
                                **mha))  # fmt: skip
    assert (args.usp_ulysses_degree, args.usp_ring_degree) == (1, 8)
    assert "U <= 8 heads per TP rank (8 key/value)" in capsys.readouterr().out


def test_auto_with_a_ring_degree_must_agree():
    args = apply_usp_args(parse(*AUTO8, "--usp-ring-degree", "1", context_parallel_size=8))
    assert args.hierarchical_context_parallel_sizes == [8, 1]
    with pytest.raises(ValueError) as error:
        apply_usp_args(parse(*AUTO8, "--usp-ring-degree", "2", context_parallel_size=8))
    assert str(error.value).startswith(
        "--usp-ring-degree 2 disagrees with --usp-ulysses-degree auto, which chose U=8 x R=1 "
        "for --context-parallel-size 8 (U divides 8 and the 8 context-parallel ranks"
    )
    assert str(error.value).endswith("drop --usp-ring-degree, or give both degrees explicitly")


def test_auto_without_context_parallelism_is_off_unless_a_ring_asks():
    args = apply_usp_args(parse("--usp-ulysses-degree", "auto"))
    assert (args.usp_ulysses_degree, args.usp_ring_degree, args.context_parallel_size) == (1, 1, 1)
    assert args.hierarchical_context_parallel_sizes is None and not usp_enabled(args)
    with pytest.raises(ValueError, match="got --usp-ring-degree 4 without it"):
        apply_usp_args(parse("--usp-ulysses-degree", "auto", "--usp-ring-degree", "4"))


@pytest.mark.parametrize(
    "flags, megatron_args, message",
    [
        (("--usp-ulysses-degree", "auto"), dict(context_parallel_size=4),
         "pass --usp-gpus-per-node, or launch with torchrun (LOCAL_WORLD_SIZE=None)"),
        (AUTO8[:2] + ("--usp-gpus-per-node", "0"), dict(context_parallel_size=4),
         "--usp-gpus-per-node must be an integer >= 1"),
        (AUTO8, dict(context_parallel_size=0), "--context-parallel-size must be an integer >= 1 "
         "(1: no context parallelism), got 0"),
        (AUTO8, dict(context_parallel_size=4, num_attention_heads=12,
                     tensor_model_parallel_size=8), "divisible by the tensor-parallel size 8"),
        (AUTO8, dict(context_parallel_size=4, num_query_groups=2, tensor_model_parallel_size=4),
         "key/value heads (--num-query-groups) 2 must be divisible by the tensor-parallel size 4"),
        (AUTO8, dict(context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 2]),
         "[2, 2] conflicts with USP's [U, R] = [4, 1]"),
    ],
)  # fmt: skip
def test_auto_refusals(monkeypatch, flags, megatron_args, message):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError) as error:
        apply_usp_args(parse(*flags, **megatron_args))
    assert message in str(error.value)


def test_auto_is_resolved_before_validation_and_parsed_strictly():
    with pytest.raises(ValueError, match="resolved by apply_usp_args: run it first"):
        validate_usp_args(parse(*AUTO8, context_parallel_size=8))
    with pytest.raises(SystemExit):
        parse("--usp-ulysses-degree", "four")
    assert parse("--usp-ulysses-degree", "2").usp_ulysses_degree == 2


def test_unknown_ring_impl_is_an_argparse_error():
    with pytest.raises(SystemExit):
        parse("--usp-ring-impl", "spiral")


U4R2 = ("--usp-ulysses-degree", "4", "--usp-ring-degree", "2")


@pytest.mark.parametrize(
    "flags, megatron_args, message",
    [
        (U4R2, dict(context_parallel_size=4), "--context-parallel-size 4 conflicts"),
        (U4R2, dict(hierarchical_context_parallel_sizes=[2, 4]), "[2, 4] conflicts"),
        (U4R2, dict(num_attention_heads=6, tensor_model_parallel_size=2), "(6 / TP 2 = 3)"),
        (U4R2, dict(num_attention_heads=12, tensor_model_parallel_size=8), "divisible by the"),
        (U4R2, dict(num_attention_heads=8, num_query_groups=3), "num_query_groups=3"),
        (U4R2, dict(seq_length=1000), "multiple of 2 * U * R = 16"),
        (U4R2 + ("--usp-ring-impl", "stripe"), dict(seq_length=1004), "multiple of U * R = 8"),
        (U4R2, dict(multi_latent_attention=True), "multi-latent attention"),
        (U4R2, dict(attention_dropout=0.1), "--attention-dropout"),
        (U4R2, dict(window_size=(128, -3)), "window_size must be"),
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


def test_heads_that_ulysses_does_not_divide_are_accepted_and_described():
    """12 heads / TP 2 = 6 over U=4 splits as 2, 2, 1, 1; GQA 4 / TP 2 = 2 key/value heads."""
    validate_usp_args(apply_usp_args(parse(*U4R2, num_attention_heads=12,
                                           tensor_model_parallel_size=2)))  # fmt: skip
    message = describe_head_split(12, 4, 2, 4)
    assert "6 query / 2 key-value heads per tensor-parallel rank" in message
    assert "query heads per ulysses rank (2, 2, 1, 1), key/value heads (1, 2, 1, 1)" in message
    assert message.endswith("imbalance (max / mean heads) 1.33")


def test_query_groups_are_read_only_with_group_query_attention():
    """Megatron-LM keeps --num-query-groups 1 by default and ignores it without
    --group-query-attention: that must not be refused."""
    args = parse(*U4R2, num_query_groups=1, group_query_attention=False)
    validate_usp_args(apply_usp_args(args))
    with pytest.raises(ValueError, match="num_query_groups=3"):
        args = parse(*U4R2, num_query_groups=3, group_query_attention=True)
        validate_usp_args(apply_usp_args(args))


@pytest.mark.parametrize(
    "cp_comm_type, degrees, ok",
    [(None, (2, 2), True), ("a2a+p2p", (2, 2), True), ("p2p", (1, 4), True),
     ("a2a", (4, 1), True), ("p2p", (2, 2), False), ("a2a", (2, 2), False),
     ("all_gather", (1, 4), False)],
)  # fmt: skip
def test_cp_comm_type_is_honoured_or_refused(cp_comm_type, degrees, ok):
    if ok:
        check_cp_comm_type(cp_comm_type, *degrees)
    else:
        with pytest.raises(ValueError, match=f"cp_comm_type={cp_comm_type!r} does not describe"):
            check_cp_comm_type(cp_comm_type, *degrees)


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
    assert core == USPCoreAttention(ring_impl="stripe", backend="reference")
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
    with pytest.raises(ValueError, match="must be at most the attention heads"):
        hooked(parse("--usp-ulysses-degree", "4", num_attention_heads=2))


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
    assert core == USPCoreAttention(ring_impl="basic", rope_sliced_for_layout=True)


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
    if hasattr(core_utils, "get_thd_batch_on_this_cp_rank"):
        replaced.append((core_utils, "get_thd_batch_on_this_cp_rank"))
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
    assert parsed.usp_ulysses_degree == 1  # the flags reach 0.19's parse_and_validate_args


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
