"""The USP flags: parsing, ``--usp-ulysses-degree auto``, and the validation that refuses
what USP cannot run (one process)."""

from __future__ import annotations

import pytest
from helpers.megatron_args import parse

from usp_megatron.megatron import apply_usp_args, validate_usp_args
from usp_megatron.megatron.arguments import usp_enabled
from usp_megatron.megatron.core_attention import describe_head_split
from usp_megatron.megatron.validation import check_cp_comm_type


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
        (U4R2, dict(window_size=(128, 4)), "--window-size 128 4: this GPT is causal"),
        (U4R2 + ("--usp-ring-impl", "basic"), dict(position_embedding_type="yarn"), "'yarn'"),
        (U4R2, dict(use_legacy_models=True), "--use-legacy-models"),
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
