"""Megatron-LM's document masking (``--reset-attention-mask --reset-position-ids
--eod-mask-loss``, the mask made in the data loader) and its uneven loss masks under USP,
without a Megatron-LM checkout: megatron-core's GPTDataset, GPTModel, schedule and DDP,
the plugin's hooks as ``pretrain_gpt.py`` meets them, against one rank (CPU, gloo): one
world of 4 processes runs every case of workers/document_mask_cases.py."""

from __future__ import annotations

import pytest
from workers.document_mask_cases import DEGREES, TOL, WORLD, run_document_cases

from usp_megatron.testing import run_distributed

CASES = [f"documents {p} U{u}R{r}" for p in ("rope", "learned_absolute") for u, r in DEGREES]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict[str, float]]]:
    per_rank = run_distributed(WORLD, run_document_cases, str(tmp_path_factory.mktemp("docs")))
    by_case: dict[str, list[dict[str, float]]] = {}
    for rank_results in per_rank:
        for name, errors in rank_results:
            by_case.setdefault(name, []).append(errors)
    return by_case


@pytest.mark.parametrize("case", CASES)
def test_documents_attend_as_one_rank_with_the_mask(results, case):
    """The packed documents' loss and gradients are one rank's with the [s, s] mask: within
    documents, per-document RoPE, the data loader's position ids, the flattened loss."""
    for rank, errors in enumerate(results[case]):
        assert max(errors.values()) <= TOL, f"rank {rank}: {errors}"


def test_a_mask_that_were_ignored_would_be_caught(results):
    for errors in results["mask ignored"]:
        assert errors["grads"] > 100 * TOL, errors


def test_uneven_loss_masks_are_weighed_by_the_groups_tokens(results):
    """Megatron's schedule divides each rank's loss by its own tokens: U2 x R2 differs from
    one rank unless the hook weighs it; the reported loss is the same either way."""
    for weighed, unweighed in zip(results["schedule U2R2 weighed"],
                                  results["schedule U2R2 unweighed"]):  # fmt: skip
        assert weighed["grads"] <= TOL and weighed["reported loss"] <= 1e-6, weighed
        assert unweighed["grads"] > 100 * TOL, unweighed
        assert unweighed["reported loss"] <= 1e-6, unweighed


def test_per_token_loss_is_left_as_megatron_computes_it(results):
    """--calculate-per-token-loss: Megatron divides by the tokens of all ranks itself; the
    hook adds nothing and U2 x R2 is one rank."""
    for errors in results["schedule U2R2 per-token"]:
        assert errors["grads"] <= TOL and errors["reported loss"] <= 1e-6, errors


def test_documents_that_differ_between_ranks_are_refused_once(results):
    said = results["cu_seqlens mismatch"]
    assert [errors["refused as said"] for errors in said] == [1.0] * WORLD
    assert [errors["speaks"] for errors in said] == [1.0, 0.0, 0.0, 0.0]
