"""``choose_degrees``: the rules always hold, clear cases come out as expected, bad input is
refused with the value named."""

from __future__ import annotations

import itertools
import re

import pytest

import usp_megatron
from usp_megatron.degrees import (
    CostModel,
    choose_degrees,
    degree_costs,
    pick,
    ulysses_candidates,
)


@pytest.mark.parametrize(
    "call, expected",
    [
        # One node of 4, 32 MHA heads: the all-to-all alone, no ring.
        (dict(cp_size=4, num_heads=32, gpus_per_node=4), (4, 1)),
        (dict(cp_size=4, num_heads=32, gpus_per_node=4, seq_len=32768), (4, 1)),
        (dict(cp_size=4, num_heads=32), (4, 1)),
        # 16 ranks over nodes of 8: the all-to-all fills a node, the ring spans the nodes.
        (dict(cp_size=16, num_heads=32, gpus_per_node=8), (8, 2)),
        (dict(cp_size=16, num_heads=32, num_kv_heads=8, gpus_per_node=8, seq_len=131072), (8, 2)),
        # 4 heads on 8 ranks: U <= heads, the ring takes the rest.
        (dict(cp_size=8, num_heads=4), (4, 2)),
        (dict(cp_size=1, num_heads=1), (1, 1)),
        (dict(cp_size=1, num_heads=32, num_kv_heads=8, seq_len=4096), (1, 1)),
        # One head: a pure ring is always allowed, also across nodes.
        (dict(cp_size=16, num_heads=1, gpus_per_node=8), (1, 16)),
        # GQA / MQA: key/value heads replicated up to U still beat a ring here.
        (dict(cp_size=4, num_heads=32, num_kv_heads=8, gpus_per_node=4, seq_len=32768), (4, 1)),
        (dict(cp_size=8, num_heads=8, num_kv_heads=1, seq_len=131072), (8, 1)),
        (dict(cp_size=8, num_heads=16, num_kv_heads=4, gpus_per_node=4, seq_len=131072), (4, 2)),
        # Nodes of 6 (U must divide 6) and a group of 4 that is not a node's divisor.
        (dict(cp_size=4, num_heads=32, gpus_per_node=6), (2, 2)),
        (dict(cp_size=12, num_heads=32, gpus_per_node=6, seq_len=65536), (6, 2)),
    ],
)
def test_clear_cases(call, expected):
    assert choose_degrees(**call) == expected


@pytest.mark.parametrize(
    "call, expected",
    [
        # 12 heads on 8: U=8 gives some ranks 2 heads and others 1 (1.33x); U=4 gives 3 each.
        (dict(cp_size=8, num_heads=12), (4, 2)),
        (dict(cp_size=8, num_heads=12, seq_len=32768), (4, 2)),
        # ... but at 4K tokens a ring of 2 costs more than that imbalance.
        (dict(cp_size=8, num_heads=12, seq_len=4096), (8, 1)),
        # U need not divide the heads: 7 heads, U=4 (2, 2, 2, 1) against longer rings.
        (dict(cp_size=8, num_heads=7, seq_len=65536), (4, 2)),
        # 5 heads: without a length only the balance counts, a pure ring is balanced.
        (dict(cp_size=8, num_heads=5, num_kv_heads=1), (1, 8)),
        (dict(cp_size=8, num_heads=5, num_kv_heads=1, seq_len=65536), (2, 4)),
        # MQA, 64 query heads, 2 ranks, 8K: the all-to-all moves every query head, the
        # ring one key/value head.
        (dict(cp_size=2, num_heads=64, num_kv_heads=1, seq_len=8192), (1, 2)),
        (dict(cp_size=2, num_heads=64, num_kv_heads=1, seq_len=131072), (2, 1)),
    ],
)
def test_cost_model_overrides_the_largest_ulysses_degree(call, expected):
    assert choose_degrees(**call) == expected


def test_exported_from_the_package():
    assert usp_megatron.choose_degrees is choose_degrees


SWEEP = list(
    itertools.product(
        range(1, 33),  # cp_size
        (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40, 64),  # query heads per TP rank
        (1, 2, 4, 8),  # query heads per key/value head (GQA group)
        (1, 2, 4, 6, 8),  # gpus_per_node
        (None, 8192, 131072, 1 << 20),  # seq_len
    )
)


def test_choice_keeps_the_rules_over_a_sweep():
    margin = CostModel().preference_margin
    for cp, heads, group, gpus, seq_len in SWEEP:
        if heads % group:
            continue
        kv_heads = heads // group
        u, r = choose_degrees(cp, heads, kv_heads, gpus, seq_len)
        case = (cp, heads, kv_heads, gpus, seq_len, u, r)
        assert u * r == cp and u <= heads and gpus % u == 0, case
        costs = {c.ulysses: c.total_s for c in degree_costs(cp, heads, kv_heads, gpus, seq_len)}
        assert sorted(costs) == ulysses_candidates(cp, heads, gpus)
        # The largest U within the margin of the cheapest: no larger U was as good.
        assert costs[u] <= min(costs.values()) * (1 + margin), case
        assert all(costs[v] > min(costs.values()) * (1 + margin) for v in costs if v > u), case
        if kv_heads == heads and all(heads % v == 0 for v in costs):
            assert u == max(costs), case  # MHA, even splits: the all-to-all as far as allowed


def test_candidates_follow_the_node_and_head_rules():
    assert ulysses_candidates(16, 32, 8) == [1, 2, 4, 8]
    assert ulysses_candidates(8, 3, 8) == [1, 2]
    assert ulysses_candidates(12, 32, 6) == [1, 2, 3, 6]
    assert ulysses_candidates(4, 32, 6) == [1, 2]
    assert ulysses_candidates(7, 32, 8) == [1]


def test_cost_terms():
    (one,) = degree_costs(1, 32, seq_len=32768)
    assert one.all_to_all_s == 0 and one.ring_s == 0
    u4, u8 = degree_costs(8, 12, seq_len=32768)[-2:]
    assert u8.compute_s / u4.compute_s == pytest.approx((2 / 3) * 2)  # ceil(12/8)=2 vs 3, R 1 vs 2
    assert u8.ring_s == 0 and u4.ring_s > 0
    mqa = {c.ulysses: c for c in degree_costs(8, 8, 1, seq_len=65536)}
    mha = {c.ulysses: c for c in degree_costs(8, 8, 8, seq_len=65536)}
    assert mqa[8].all_to_all_s == mha[8].all_to_all_s  # one key/value head replicated to 8
    assert mqa[1].ring_s < mha[1].ring_s  # the ring sends only the key/value heads
    # A ring that leaves the node is slower than one inside it.
    inside = degree_costs(8, 32, gpus_per_node=8, seq_len=32768)
    across = degree_costs(8, 32, gpus_per_node=4, seq_len=32768)
    assert across[0].ring_s > inside[0].ring_s
    assert pick(inside).ulysses == 8 and pick(across).ulysses == 4


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(cp_size=0, num_heads=8), "cp_size must be an integer >= 1.*got 0"),
        (dict(cp_size=-4, num_heads=8), "cp_size must be an integer >= 1.*got -4"),
        (dict(cp_size=4.0, num_heads=8), "cp_size must be an integer >= 1.*got 4.0"),
        (dict(cp_size=True, num_heads=8), "cp_size must be an integer >= 1.*got True"),
        (dict(cp_size=4, num_heads=0), "num_heads must be an integer >= 1.*got 0"),
        (dict(cp_size=4, num_heads=8, num_kv_heads=0), "num_kv_heads must be an integer >= 1"),
        (dict(cp_size=4, num_heads=8, num_kv_heads=3), "num_heads=8 must be a multiple of "
         "num_kv_heads=3"),
        (dict(cp_size=4, num_heads=8, num_kv_heads=16), "multiple of num_kv_heads=16"),
        (dict(cp_size=4, num_heads=8, gpus_per_node=0), "gpus_per_node must be an.*got 0"),
        (dict(cp_size=4, num_heads=8, seq_len=0), "seq_len must be an integer >= 1.*got 0"),
    ],
)  # fmt: skip
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError) as error:
        choose_degrees(**call)
    assert re.search(message, str(error.value)), str(error.value)
