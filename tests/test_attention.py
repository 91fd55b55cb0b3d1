"""USP attention on N processes vs one-rank float64 attention: output and gradients.

CPU: gloo, float32, the reference kernel, tolerance 1e-5, with head counts that ``U``
divides and that it does not (uneven splits). GPU (marked ``gpu``): NCCL, bf16, PyTorch's
kernels, tolerance 1e-2 (bf16 inputs and outputs, float32 merging).
"""

import itertools
import math

import pytest
import torch
from helpers.worlds import factorizations, failed_cases
from workers.usp_cases import run_all_cases, run_window_cases

from usp_megatron.heads import HeadRun, head_split
from usp_megatron.testing import run_distributed


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_usp_matches_single_rank_float32(world_size):
    per_rank = run_distributed(world_size, run_all_cases, "cpu", "float32", "reference")
    assert len(per_rank[0]) >= 3 * 2 * 3, "too few cases ran"
    failures = failed_cases(per_rank, 1e-5)
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
    failures = failed_cases(per_rank, 1e-2)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("world_size", [2, 4])
def test_sliding_window_matches_single_rank_float32(world_size):
    per_rank = run_distributed(world_size, run_window_cases, "cpu", "float32", "reference")
    assert len(per_rank[0]) >= 3 * 2 * 3, "too few cases ran"
    failures = failed_cases(per_rank, 1e-5)
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
    failures = failed_cases(per_rank, 1e-2)
    assert not failures, "\n".join(failures[:20])


def test_kv_heads_replicated_just_enough():
    """U dividing hq: every rank gets lcm(hkv, U) / U key/value heads (one equal split)."""
    assert head_split(32, 8, 4).kv_heads == (2, 2, 2, 2)
    assert head_split(32, 2, 4).kv_index == ((0,), (0,), (1,), (1,))
    assert head_split(12, 6, 4).kv_index == ((0, 0, 1), (1, 2, 2), (3, 3, 4), (4, 5, 5))
    assert head_split(8, 1, 8).kv_heads == (1,) * 8


def test_uneven_split_sends_what_each_range_reads():
    """hq=6, hkv=2 over U=4: ranges 0-1, 2-3, 4, 5; rank 1's range straddles the two groups."""
    split = head_split(6, 2, 4)
    assert split.q_heads == (2, 2, 1, 1)
    assert split.kv_index == ((0,), (0, 1), (1,), (1,))
    assert split.q_runs == [HeadRun(1, 2), HeadRun(1, 2), HeadRun(2, 1)]
    assert split.kv_runs == [HeadRun(1, 1), HeadRun(1, 2), HeadRun(2, 1)]
    assert split.imbalance == pytest.approx(2 / 1.5)
    assert head_split(7, 1, 4).kv_index == ((0,),) * 4  # MQA: one head to every rank


@pytest.mark.parametrize("hq", range(1, 29))
def test_every_query_head_reads_its_own_kv_head(hq):
    """For every U <= hq and hkv | hq: contiguous ranges in rank order, sizes within one of
    each other, and local GQA (query i reads received head i // ratio) giving head h // g."""
    for ulysses, hkv in itertools.product(range(1, hq + 1), range(1, hq + 1)):
        if hq % hkv:
            continue
        split, group, first = head_split(hq, hkv, ulysses), hq // hkv, 0
        assert sum(split.q_heads) == hq and max(split.q_heads) - min(split.q_heads) <= 1
        for count, kv in zip(split.q_heads, split.kv_index):
            ratio = count // len(kv)
            assert ratio * len(kv) == count
            assert [kv[i // ratio] for i in range(count)] == [
                head // group for head in range(first, first + count)
            ]
            first += count
        if hq % ulysses == 0:
            assert split.kv_heads == (math.lcm(hkv, ulysses) // ulysses,) * ulysses
        for runs, counts in ((split.q_runs, split.q_heads), (split.kv_runs, split.kv_heads)):
            assert [run.heads for run in runs for _ in range(run.ranks)] == list(counts)


def test_replicated_kv_gradients_sum_back():
    """The irregular replication (an index, not a repeat) is differentiable: copies sum."""
    split = head_split(6, 2, 4)
    kv = torch.randn(1, 2, 2, 3, requires_grad=True)
    sent = split.replicate_kv(kv)
    assert torch.equal(sent, kv[:, :, [0, 0, 1, 1, 1]])
    sent.sum().backward()
    assert torch.equal(kv.grad[0, 0, :, 0], torch.tensor([2.0, 3.0]))
