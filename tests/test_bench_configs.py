"""The benchmarks' one parser of sizes (attnbench.configs): good values parse, bad ones
fail with a ValueError that names the flag and the value."""

import importlib.util
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parents[1] / "benchmarks" / "attnbench" / "configs.py"


def _load_configs():
    """The benchmark module, loaded from its file (the tests import nothing else from
    ``benchmarks/``); it needs nothing beyond the standard library."""
    spec = importlib.util.spec_from_file_location("attnbench_configs", CONFIGS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


configs = _load_configs()


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("256", 256),
        ("32768", 32768),
        ("32K", 32768),
        ("32k", 32768),
        (" 128K ", 131072),
        ("1M", 2**20),
    ],
)
def test_seq_len_parses_counts_and_k_m_suffixes(text, tokens):
    assert configs.parse_seq_len(text) == tokens


@pytest.mark.parametrize("text", ["", "K", "0", "0K", "-1", "1.5K", "32Q", "32KB", "x"])
def test_seq_len_rejects_with_the_value(text):
    with pytest.raises(ValueError, match=rf"--seq-len entry {text!r} is not a positive"):
        configs.parse_seq_len(text, "--seq-len")


def test_seq_lens_is_a_list_and_needs_one():
    assert configs.parse_seq_lens("32K,65536, 128K") == [32768, 65536, 131072]
    with pytest.raises(ValueError, match="--seqlens ' , ' names no sequence length"):
        configs.parse_seq_lens(" , ")
    with pytest.raises(ValueError, match="--seqlens entry '64Kb'"):
        configs.parse_seq_lens("32K,64Kb")


@pytest.mark.parametrize(
    "world, pairs",
    [
        (1, [(1, 1)]),
        (2, [(1, 2), (2, 1)]),
        (4, [(1, 4), (2, 2), (4, 1)]),
        (6, [(1, 6), (2, 3), (3, 2), (6, 1)]),
        (8, [(1, 8), (2, 4), (4, 2), (8, 1)]),
    ],
)
def test_factorizations_every_u_times_r(world, pairs):
    assert configs.factorizations(world) == pairs


def test_configs_default_and_given():
    assert configs.parse_configs(None, 4) == configs.factorizations(4)
    assert configs.parse_configs("2x2, 4X1", 4) == [(2, 2), (4, 1)]


@pytest.mark.parametrize(
    "text, world, message",
    [
        ("2x", 4, "--configs entry '2x' is not UxR"),
        ("2x2x1", 4, "--configs entry '2x2x1' is not UxR"),
        ("axb", 4, "--configs entry 'axb' is not UxR"),
        ("2x2,3x1", 4, r"--configs entry '3x1': 3 \* 1 != world size 4"),
        ("-1x-4", 4, "--configs entry '-1x-4': U and R must be positive"),
        ("", 4, "--configs '' names no UxR entry"),
    ],
)
def test_configs_rejects_with_the_entry(text, world, message):
    with pytest.raises(ValueError, match=message):
        configs.parse_configs(text, world)


def test_configs_error_names_the_flag_given():
    with pytest.raises(ValueError, match="--trace entry '8x1'"):
        configs.parse_configs("8x1", 4, "--trace")


def test_kv_heads():
    assert configs.kv_head_counts(32, "off") == [32]
    assert configs.kv_head_counts(32, "on") == [8]
    assert configs.kv_head_counts(32, "both") == [32, 8]
    assert configs.kv_head_counts(6, "off") == [6]
    with pytest.raises(ValueError, match="--gqa needs --heads divisible by 4, got 6"):
        configs.kv_head_counts(6, "both")
    with pytest.raises(ValueError, match="--heads must be positive, got 0"):
        configs.kv_head_counts(0, "off")
    with pytest.raises(ValueError, match="--gqa 'half'"):
        configs.kv_head_counts(32, "half")


def test_check_choices_names_the_bad_values():
    configs.check_choices("--modes", ["fwd"], ("fwd", "fwdbwd"))
    with pytest.raises(ValueError, match=r"--modes: \['bwd'\] not in \['fwd', 'fwdbwd'\]"):
        configs.check_choices("--modes", ["fwd", "bwd"], ("fwd", "fwdbwd"))
