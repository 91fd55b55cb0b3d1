"""The Megatron-LM hooks fed each supported tag's own argument defaults (one process).

``tests/data/megatron_lm_<tag>_defaults.json`` holds every default of Megatron-LM's parser at
that tag, written by ``tools/dump_megatron_lm_defaults.py`` from a checkout (CI has none).
A stand-in for Megatron-LM's ``parse_args`` builds a parser with those defaults (and its
``--cp-comm-type`` flag, ``nargs='+'``), lets the ``extra_args_provider`` add the ``--usp-*``
flags as the patch and the launcher do, and parses; the plugin's ``validate_args`` hook then
runs around an identity stand-in for Megatron's own ``validate_args``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from megatron.core.transformer.transformer_config import TransformerConfig

from usp_megatron.megatron.megatron_lm import (
    SUPPORTED_TAGS,
    USPArgumentError,
    with_usp_args,
    wrap_parse_args,
    wrap_validate_args,
)
from usp_megatron.megatron.validation import check_cp_comm_type

DATA = Path(__file__).parent / "data"
# What a user types for the model; everything else keeps the tag's default.
MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=8, seq_length=128,
             max_position_embeddings=128, attention_dropout=0.0)  # fmt: skip
# What USP sets, by degrees: the all-to-all, the ring, or both.
USP_COMM = {(2, 2): "a2a+p2p", (4, 1): "a2a", (1, 4): "p2p", (2, 1): "a2a", (1, 2): "p2p",
            (8, 1): "a2a", (2, 4): "a2a+p2p"}  # fmt: skip
ENTRY = ["patch", "launcher"]


def defaults(tag: str) -> dict:
    return json.loads((DATA / f"megatron_lm_{tag}_defaults.json").read_text())["defaults"]


def parse(tag: str, *flags: str, entry: str = "patch") -> argparse.Namespace:
    """``flags`` parsed as Megatron-LM's ``parse_args`` of ``tag`` would, entered through the
    patch (``with_usp_args`` as the script's provider) or the launcher (``parse_args``
    hooked), with the model flags of ``MODEL`` typed."""
    tag_defaults = defaults(tag)

    def megatron_parse_args(extra_args_provider=None, ignore_unknown_args=False):
        parser = argparse.ArgumentParser(allow_abbrev=False)
        parser.add_argument("--cp-comm-type", nargs="+", type=str,
                            default=tag_defaults["cp_comm_type"])  # fmt: skip
        parser.set_defaults(**{k: v for k, v in tag_defaults.items() if k != "cp_comm_type"})
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return parser.parse_args(list(flags))

    if entry == "patch":
        args = megatron_parse_args(with_usp_args(None))
    else:
        args = wrap_parse_args(megatron_parse_args)(None)
    vars(args).update(MODEL, rank=0, world_size=8)  # parse_args reads the last two from env
    return args


def validate(args: argparse.Namespace) -> dict:
    """The hook around an identity ``validate_args``; what Megatron's own one was given."""
    seen = {}

    def megatron_validate_args(args, defaults={}):  # noqa: B006 (Megatron-LM's signature)
        seen.update(vars(args), cp_comm_type=list(args.cp_comm_type))
        seen["cp_comm_type_type"] = type(args.cp_comm_type)
        return args

    wrap_validate_args(megatron_validate_args)(args, {})
    return seen


def layer_cp_comm_types(args: argparse.Namespace, tag: str) -> list[object]:
    """The ``cp_comm_type`` each layer's core attention (``USPAttention``) is built with.

    Megatron-LM's ``core_transformer_config_from_args`` copies ``args.cp_comm_type`` into
    the config and, for one entry, replaces the list by its string; ``TransformerConfig``
    checks it; ``TransformerLayer`` hands the attention the string, or its layer's entry of a
    list (0.19.0 by ``layer_number - 1``; 0.16.1 by ``layer_number``, which runs past the
    list at the last layer: its own bug, that layer is left out here).
    """
    value = args.cp_comm_type
    value = value[0] if len(value) == 1 else list(value)
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        context_parallel_size=args.context_parallel_size,
        hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
        cp_comm_type=value,
    )
    layers = range(1, config.num_layers + 1)
    if not isinstance(config.cp_comm_type, list):
        return [config.cp_comm_type for _ in layers]
    first = 0 if tag == "core_v0.16.1" else 1
    return [config.cp_comm_type[n - first] for n in layers if n - first < config.num_layers]


@pytest.mark.parametrize("tag", SUPPORTED_TAGS)
def test_defaults_are_megatron_lms_own(tag):
    tag_defaults = defaults(tag)
    assert len(tag_defaults) > 600  # every argument of the tag's parser, not a chosen few
    assert tag_defaults["cp_comm_type"] == ["p2p"]  # the default that USP must replace
    assert tag_defaults["context_parallel_size"] == 1
    assert tag_defaults["hierarchical_context_parallel_sizes"] is None


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("degrees", sorted(USP_COMM))
@pytest.mark.parametrize("tag", SUPPORTED_TAGS)
def test_usp_sets_cp_comm_type_over_each_tags_defaults(tag, degrees, entry):
    u, r = degrees
    args = parse(tag, "--usp-ulysses-degree", str(u), "--usp-ring-degree", str(r), entry=entry)
    assert args.cp_comm_type == ["p2p"]  # still Megatron's default to anyone reading it
    seen = validate(args)
    # Megatron's validate_args is handed a plain list naming what USP does, with the
    # hierarchical sizes its "a2a+p2p" check asks for.
    assert seen["cp_comm_type"] == [USP_COMM[degrees]] and seen["cp_comm_type_type"] is list
    assert (seen["context_parallel_size"], seen["hierarchical_context_parallel_sizes"]) == (
        u * r,
        [u, r],
    )
    for value in args.cp_comm_type:
        check_cp_comm_type(value, u, r)
    assert layer_cp_comm_types(args, tag) == [USP_COMM[degrees]] * MODEL["num_layers"]
    for value in layer_cp_comm_types(args, tag):
        check_cp_comm_type(value, u, r)  # what USPAttention checks when it is built
    # Nothing else of the tag's defaults moved.
    usp_sets = {"cp_comm_type", "context_parallel_size", "hierarchical_context_parallel_sizes"}
    for name, default in defaults(tag).items():
        if name not in usp_sets and name not in MODEL:
            assert getattr(args, name) == default, name


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("tag", SUPPORTED_TAGS)
def test_usp_off_leaves_megatrons_default(tag, entry):
    args = parse(tag, entry=entry)
    validate(args)
    assert args.cp_comm_type == ["p2p"] and type(args.cp_comm_type) is list
    for name, default in defaults(tag).items():
        if name not in MODEL:
            assert getattr(args, name) == default, name
    # A typed value without USP is Megatron's business.
    args = parse(tag, "--cp-comm-type", "a2a", "--usp-ring-degree", "1", entry=entry)
    validate(args)
    assert args.cp_comm_type == ["a2a"] and args.hierarchical_context_parallel_sizes is None


@pytest.mark.parametrize(
    "typed, degrees, bad",
    [
        (["p2p"], (2, 2), "p2p"),
        (["a2a"], (2, 2), "a2a"),
        (["p2p"], (4, 1), "p2p"),
        (["a2a"], (1, 4), "a2a"),
        (["all_gather"], (1, 4), "all_gather"),
        (["a2a+p2p", "a2a+p2p", "a2a", "a2a"], (1, 4), "a2a"),  # one layer's entry
    ],
)
@pytest.mark.parametrize("tag", SUPPORTED_TAGS)
def test_typed_cp_comm_type_that_contradicts_the_degrees_is_refused(tag, typed, degrees, bad):
    u, r = degrees
    flags = ["--usp-ulysses-degree", str(u), "--usp-ring-degree", str(r)]
    args = parse(tag, *flags, "--cp-comm-type", *typed)
    with pytest.raises(USPArgumentError) as error:
        validate(args)
    want = USP_COMM[degrees]
    assert str(error.value) == (
        f"--cp-comm-type {' '.join(typed)} contradicts --usp-ulysses-degree {u} x "
        f"--usp-ring-degree {r}: {bad!r} does not describe USP, which communicates as "
        f"{want!r} with these degrees; drop --cp-comm-type (USP sets it) or pass "
        f"--cp-comm-type {want}"
    )


@pytest.mark.parametrize(
    "typed, degrees",
    [(["a2a+p2p"], (2, 2)), (["a2a+p2p"], (4, 1)), (["p2p"], (1, 4)), (["a2a"], (4, 1))],
)  # fmt: skip
@pytest.mark.parametrize("tag", SUPPORTED_TAGS)
def test_typed_cp_comm_type_that_agrees_is_kept(tag, typed, degrees):
    u, r = degrees
    args = parse(tag, "--usp-ulysses-degree", str(u), "--usp-ring-degree", str(r),
                 "--cp-comm-type", *typed)  # fmt: skip
    assert validate(args)["cp_comm_type"] == typed
    for value in layer_cp_comm_types(args, tag):
        check_cp_comm_type(value, u, r)


@pytest.mark.parametrize(
    "typed, degrees",
    [(["a2a+p2p"] * 4, (2, 2)), (["a2a", "a2a+p2p", "a2a", "a2a+p2p"], (4, 1)),
     (["p2p"] * 4, (1, 4))],
)  # fmt: skip
@pytest.mark.parametrize("tag", SUPPORTED_TAGS)
def test_per_layer_cp_comm_type_that_agrees_becomes_one_value(tag, typed, degrees):
    """One entry per layer, all agreeing with the degrees: every layer builds with USP's one
    value (0.16.1 would index the list from 1 and fail at the last layer: IndexError)."""
    u, r = degrees
    args = parse(tag, "--usp-ulysses-degree", str(u), "--usp-ring-degree", str(r),
                 "--cp-comm-type", *typed)  # fmt: skip
    assert validate(args)["cp_comm_type"] == [USP_COMM[degrees]]
    assert layer_cp_comm_types(args, tag) == [USP_COMM[degrees]] * MODEL["num_layers"]


@pytest.mark.parametrize("tag", SUPPORTED_TAGS)
def test_cp_comm_type_list_of_another_length_than_the_layers_is_refused(tag):
    args = parse(tag, "--usp-ulysses-degree", "2", "--usp-ring-degree", "2",
                 "--cp-comm-type", "a2a+p2p", "a2a+p2p")  # fmt: skip
    with pytest.raises(USPArgumentError) as error:
        validate(args)
    assert str(error.value) == (
        "--cp-comm-type a2a+p2p a2a+p2p gives 2 values for --num-layers 4: give one per layer "
        "or one for all (or drop --cp-comm-type: USP sets it)"
    )
