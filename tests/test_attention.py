"""USP attention on N gloo processes vs one-rank float64 attention: output and gradients."""

import pytest
from usp_cases import run_all_cases

from usp_megatron.testing import run_distributed


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_usp_matches_single_rank_float32(world_size):
    per_rank = run_distributed(world_size, run_all_cases, "cpu", "float32", "reference")
    failures = [
        f"rank {rank}: {case}: {errors}"
        for rank, results in enumerate(per_rank)
        for case, errors in results
        if max(errors.values()) > 1e-5
    ]
    assert len(per_rank[0]) >= 3 * 2 * 3, "too few cases ran"
    assert not failures, "\n".join(failures[:20])
