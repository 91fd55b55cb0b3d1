"""USP attention on N processes vs one-rank float64 attention: output and gradients.

CPU: gloo, float32, the reference kernel, tolerance 1e-5. GPU (marked ``gpu``): NCCL,
bf16, PyTorch's kernels, tolerance 1e-2 (bf16 inputs and outputs, float32 merging).
"""

import pytest
import torch
from usp_cases import factorizations, run_all_cases, run_window_cases

from usp_megatron.attention import kv_heads_for_ulysses
from usp_megatron.testing import run_distributed


def _failures(per_rank, tol):
    return [
        f"rank {rank}: {case}: {errors}"
        for rank, results in enumerate(per_rank)
        for case, errors in results
        if not max(errors.values()) <= tol
    ]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_usp_matches_single_rank_float32(world_size):
    per_rank = run_distributed(world_size, run_all_cases, "cpu", "float32", "reference")
    assert len(per_rank[0]) >= 3 * 2 * 3, "too few cases ran"
    failures = _failures(per_rank, 1e-5)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "torch_flash", "torch_efficient"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_usp_matches_single_rank_bf16_nccl(world_size, backend):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    per_rank = run_distributed(
        world_size, run_all_cases, "cuda", "bfloat16", backend, 128, 64, backend="nccl"
    )
    assert len(per_rank[0]) >= 3 * 2 * 3 * len(factorizations(world_size)), "too few cases"
    failures = _failures(per_rank, 1e-2)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("world_size", [2, 4])
def test_sliding_window_matches_single_rank_float32(world_size):
    per_rank = run_distributed(world_size, run_window_cases, "cpu", "float32", "reference")
    assert len(per_rank[0]) >= 3 * 2 * 3, "too few cases ran"
    failures = _failures(per_rank, 1e-5)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "torch_flash"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sliding_window_bf16_nccl(world_size, backend):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    per_rank = run_distributed(
        world_size, run_window_cases, "cuda", "bfloat16", backend, 128, 64, backend="nccl"
    )
    failures = _failures(per_rank, 1e-2)
    assert not failures, "\n".join(failures[:20])


def test_kv_heads_replicated_just_enough():
    assert kv_heads_for_ulysses(32, 8, 4) == 8
    assert kv_heads_for_ulysses(32, 2, 4) == 4
    assert kv_heads_for_ulysses(12, 6, 4) == 12
    assert kv_heads_for_ulysses(8, 1, 8) == 8
