"""The log-sum-exp merge."""

import torch
from helpers.oracle import rel_error

from usp_megatron.ring.merge import merge_by_lse


def _partial(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    lse = scores.logsumexp(-1)
    return torch.einsum("bhqk,bkhd->bqhd", (scores - lse.unsqueeze(-1)).exp(), v), lse


def test_merge_of_two_key_sets_is_attention_over_their_union():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out_a, lse_a = _partial(q, k[:, :4], v[:, :4])
    out_b, lse_b = _partial(q, k[:, 4:], v[:, 4:])
    full, full_lse = _partial(q, k, v)
    merge_by_lse(out_a, lse_a, out_b, lse_b)
    assert rel_error(out_a, full) < 1e-14 and rel_error(lse_a, full_lse) < 1e-14


def test_empty_accumulator_rows_take_the_block():
    out = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    lse = torch.full((1, 1, 2), float("-inf"), dtype=torch.float64)
    block = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    merge_by_lse(out, lse, block, torch.tensor([[[0.5, -1.0]]], dtype=torch.float64))
    assert torch.equal(out, block) and lse.tolist() == [[[0.5, -1.0]]]
