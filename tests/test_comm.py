"""The all-to-all halves (even and uneven head splits) and the word copy, exactly (no
arithmetic, so equality)."""

import pytest
import torch
from workers.comm_cases import all_to_all_round_trip

from usp_megatron.tensors import _as_words, copy_words_
from usp_megatron.testing import run_distributed


@pytest.mark.parametrize(
    "dtype_name,head_dim,gloo_path",
    [
        ("bfloat16", 8, "point_to_point"),
        ("float32", 3, "point_to_point"),
        ("bfloat16", 8, "collectives"),
        ("bfloat16", 8, "collectives without list"),
    ],
)
def test_all_to_all_round_trip(dtype_name, head_dim, gloo_path):
    """bf16 with d=8 moves 8-byte words; float32 with d=3 (12 bytes) cannot and falls back;
    gloo's all-to-alls are sends and receives, NCCL's the collectives run here on gloo."""
    problems = run_distributed(4, all_to_all_round_trip, dtype_name, head_dim, gloo_path)
    assert problems == [[] for _ in range(4)], problems


def _cases():
    """(name, dst, src, moves words)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, 8, generator=gen).to(torch.bfloat16)
    bf16 = torch.empty(4, 6, 2, 8, dtype=torch.bfloat16)
    yield "permuted bf16", bf16, x.permute(2, 1, 0, 3), True
    yield "float32 12-byte rows", torch.empty(3, 5), torch.randn(5, 3, generator=gen).t(), False
    yield "misaligned offset", torch.empty(7, dtype=torch.bfloat16), x.reshape(-1)[1:8], False
    yield "dtype change", torch.empty(4, 6, 2, 8), x.permute(2, 1, 0, 3), False


@pytest.mark.parametrize("name,dst,src,words", list(_cases()), ids=[c[0] for c in _cases()])
def test_copy_words_equals_copy(name, dst, src, words):
    want = torch.empty_like(dst).copy_(src)
    moves_words = dst.dtype == src.dtype and None not in (_as_words(dst), _as_words(src))
    assert moves_words == words, name
    assert copy_words_(dst, src) is dst
    assert torch.equal(dst, want), name
