"""Batch split, RoPE slice, USPAttention's construction checks and the Megatron-LM hooks on
real Megatron groups: one world of 4 CPU processes (gloo) runs every check of
workers/megatron_layout_cases.py."""

from __future__ import annotations

import pytest
from workers.megatron_layout_cases import LAYOUTS, WORLD, run_layout_checks

from usp_megatron.testing import run_distributed


@pytest.fixture(scope="module")
def results() -> dict[str, object]:
    per_rank = run_distributed(WORLD, run_layout_checks)
    return {key: [rank[key] for rank in per_rank] for key in per_rank[0]}


def test_layout_checks_pass_on_every_rank(results):
    checks = {k: v for k, v in results.items() if not k.startswith("error")}
    assert len(checks) == len(LAYOUTS) * (5 + 5 * 3)
    failed = [name for name, per_rank in checks.items() if not all(per_rank)]
    assert not failed, failed


@pytest.mark.parametrize(
    "case, words",
    [
        ("packed", "hybrid context-parallel entries ['local_cp_size']: drop --hybrid-context"),
        (
            "heads",
            "ulysses degree 4 must be at most the attention heads per tensor-parallel "
            "rank (2 / TP 1 = 2)",
        ),
        ("dropout", "attention_dropout (--attention-dropout) to 0.0, got 0.1"),
        ("mask", "causal or no_mask"),
        ("no hierarchical groups", "hierarchical_context_parallel_sizes=[U, R]"),
    ],
)
def test_usp_attention_refuses_at_construction(results, case, words):
    for message in results[f"error: {case}"]:
        assert words in message, message
