"""USP core attention inside megatron-core's GPTModel vs a one-rank GPTModel (CPU, gloo):
one world of 4 processes runs every case of workers/megatron_model_cases.py."""

from __future__ import annotations

import pytest
from workers.megatron_model_cases import TOL, WORLD, _cases, label, run_model_cases

from usp_megatron.testing import run_distributed


@pytest.fixture(scope="module")
def per_rank() -> list[list[tuple[str, dict[str, float], list[str]]]]:
    return run_distributed(WORLD, run_model_cases, _cases())


@pytest.fixture(scope="module")
def results(per_rank) -> dict[str, list[dict[str, float]]]:
    by_case: dict[str, list[dict[str, float]]] = {}
    for rank_results in per_rank:
        for name, errors, _ in rank_results:
            by_case.setdefault(name, []).append(errors)
    return by_case


@pytest.mark.parametrize(
    "case", [c for c in _cases() if c["fix_rope"] or c["impl"] == "zigzag"], ids=label
)
def test_gpt_logits_and_grads_match_one_rank(results, case):
    per_rank = results[label(case)]
    assert len(per_rank) == WORLD
    for rank, errors in enumerate(per_rank):
        assert max(errors.values()) <= TOL, f"rank {rank}: {errors}"


@pytest.mark.parametrize(
    "case", [c for c in _cases() if not c["fix_rope"] and c["impl"] != "zigzag"], ids=label
)
def test_wrong_rope_slice_is_caught(results, case):
    """Without ``use_usp_rotary_embedding`` the first forward refuses to run; forced to run
    (negative control), a wrong RoPE slice makes the comparison above fail."""
    assert all(errors["refused without the call"] == 1.0 for errors in results[label(case)])
    worst = max(max(errors["logits"], errors["grads"]) for errors in results[label(case)])
    assert worst > 100 * TOL, f"a wrong RoPE slice went unnoticed: {results[label(case)]}"


def test_head_split_is_logged_once_by_rank_0(per_rank):
    """Building layer 1 logs the split of 6 heads over U=4 and its cost, on rank 0 only."""
    case = label(dict(tp=1, u=4, r=1, impl="zigzag", heads=6, kv=6, fix_rope=True))
    logged = [messages for rank_results in per_rank
              for name, _, messages in rank_results if name == case]  # fmt: skip
    assert logged[1:] == [[]] * (WORLD - 1), logged
    (message,) = logged[0]
    assert "query heads per ulysses rank (2, 2, 1, 1)" in message, message
    assert "imbalance (max / mean heads) 1.33" in message, message
