"""Bad configurations raise ValueError naming the value and what is valid; nothing hangs."""

import re

import pytest
from workers.error_cases import try_bad_inputs

from usp_megatron.testing import run_distributed

EXPECTED = {
    "degree product": "2 \\* 3 = 6 must equal the group size 4",
    "zero degree": "ulysses_degree must be an integer >= 1.*got 0",
    "heads vs ulysses": "ulysses_degree 2 must be between 1 and the query heads 1",
    "uneven head chunks": "head_chunks=2 needs the query heads 3 to split evenly over "
    "ulysses_degree 2 \\(they split as \\(2, 1\\)\\); use head_chunks=1",
    "gqa ratio": "query heads 4 must be a multiple of key/value heads 3",
    "zigzag seq len": "sequence length 12 must be a positive multiple of 2 \\* U \\* R = 8",
    "dtype mismatch": "dtypes differ",
    "shape mismatch": "must match q in batch, sequence",
    "not 4-D": "must be \\[b, s_local, heads, head_dim\\]",
    "unknown impl": "layout must be one of \\('basic', 'zigzag', 'stripe'\\), got 'spiral'",
    "layout vs ring_impl": "layout='stripe' and ring_impl='basic' disagree",
    "layout of other degrees": "is for ulysses degree 4 x ring degree 1, but the groups are 2 x 2",
    "stripe shard, zigzag attention": "differs from the module's ZigzagLayout",
    "unknown backend": "backend must be one of .* got 'xformers'",
    "backend on wrong device": "'torch_flash' cannot run on device cpu",
    "head chunks": "head_chunks=3 must divide the query heads per rank 2",
    "zero head chunks": "head_chunks must be an integer >= 1.*got 0",
    "lengths differ": "the ranks of one USP group passed different inputs \\(rank 0: q "
    "\\[1, 4, 4, 8\\].*; ranks 1, 2, 3: q \\[1, 8, 4, 8\\].*s_local = S / \\(U x R\\)",
    "causal differs": "ranks 0, 1, 2: .*, causal, .*; rank 3: .*, not causal",
    "[b, h, s, d] for bshd": "q of shape \\(1, 4, 8, 8\\) read as "
    "\\[b, s_local, heads, head_dim\\] \\(qkv_format='bshd'\\) has 8 at dim 2, "
    "but the module was built with num_heads=4; its dim 1 has 4: "
    "was it meant to be transposed\\? \\(e.g. q.transpose\\(1, 2\\)\\)",
    "unknown qkv_format": "qkv_format must be one of \\('bshd', 'sbhd'\\).*got 'bhsd'",
    "zero num_heads": "num_heads must be an integer >= 1, got 0",
    "shard dim": "dim 4 is not a dimension of a 4-D tensor of shape \\(1, 4, 4, 8\\)",
    "integer q": "q, k, v must be floating point \\(float16, bfloat16, float32, float64\\), got "
    "torch.int32",
    "head_dim 0": "head_dim must be at least 1",
    "softmax_scale": "softmax_scale must be a finite number .*got '0.1'",
    "gather shapes differ": "the ranks hold shards of different shapes \\(rank 0: "
    "\\[1, 4, 4, 8\\], rank 1: \\[1, 8, 4, 8\\]",
    "still works": "ok",
    "sbhd matches bshd": "ok",
    "uneven heads run": "ok",
}


@pytest.fixture(scope="module")
def messages():
    return run_distributed(4, try_bad_inputs, timeout_s=300)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_is_refused_clearly(messages, case):
    for rank, per_rank in enumerate(messages):
        assert case in per_rank, f"rank {rank} did not try {case}"
        assert re.search(EXPECTED[case], per_rank[case]), f"rank {rank}: {per_rank[case]!r}"
