"""Packed documents (THD): the layout, and USP attention on N processes against float64
document-causal attention (outputs and gradients of real tokens; exact zeros at padding)."""

import pytest
import torch
from helpers.oracle import thd_partitioned_indices
from helpers.worlds import failed_cases
from workers.packed_cases import cumulative, padded_lengths, run_packed_cases

from usp_megatron import local_positions
from usp_megatron.layout import get_layout
from usp_megatron.testing import run_distributed

DEGREES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4), (2, 3)]
REAL_LENGTHS = [[1], [5, 1, 17, 2], [1, 1, 1, 2, 0, 3]]


def _layout(ulysses, ring, real):
    cp = ulysses * ring
    cu = torch.tensor(cumulative(real), dtype=torch.int32)
    cu_padded = torch.tensor(cumulative(padded_lengths(real, cp)), dtype=torch.int32)
    return get_layout("zigzag", ulysses, ring).packed(cu_padded, cu), cu_padded


@pytest.mark.parametrize("real", REAL_LENGTHS)
@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_positions_are_megatron_thd_split_and_partition(ulysses, ring, real):
    layout, cu_padded = _layout(ulysses, ring, real)
    seq_len = int(cu_padded[-1])
    held = []
    for c in range(ulysses * ring):
        got = local_positions(
            seq_len, ulysses, ring, c % ulysses, c // ulysses, "zigzag", cu_padded
        )
        assert torch.equal(got, thd_partitioned_indices(cu_padded.tolist(), ulysses * ring, c))
        held.append(got)
    assert torch.equal(torch.cat(held).sort().values, torch.arange(seq_len))
    for r in range(ring):  # the all-to-all's staging index sorts every ring block
        block = layout.ring_block_positions(seq_len, r)
        shards = torch.cat([layout.positions(seq_len, u, r) for u in range(ulysses)])
        reordered = torch.empty_like(shards)
        reordered[layout.ulysses_placement.rows] = shards
        assert torch.equal(reordered, block)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("real", REAL_LENGTHS)
@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_block_tasks_compute_exactly_the_document_mask(ulysses, ring, real, causal):
    """Every ring block pair's tasks cover exactly: same document, both real, and causal
    by global position; steps after ring_steps have none."""
    layout, cu_padded = _layout(ulysses, ring, real)
    seq_len = int(cu_padded[-1])
    document = torch.full((seq_len,), -1)
    for n, (start, length) in enumerate(zip(cu_padded.tolist(), real)):
        document[start : start + length] = n
    block_len = seq_len // ring
    steps = layout.ring_steps(block_len, causal)
    for r in range(ring):
        q_pos = layout.ring_block_positions(seq_len, r)
        for step in range(ring):
            kv_rank = (r - step) % ring
            k_pos = layout.ring_block_positions(seq_len, kv_rank)
            want = (document[q_pos][:, None] == document[k_pos][None, :]) & (
                document[q_pos][:, None] >= 0
            )
            if causal:
                want &= k_pos[None, :] <= q_pos[:, None]
            tasks = layout.block_tasks(r, kv_rank, block_len, causal)
            got = torch.zeros(block_len, block_len, dtype=torch.int64)
            for task in tasks:
                got += task.mask.visible(block_len, block_len).long()
            assert torch.equal(got, want.long()), (r, kv_rank)
            if step >= steps:
                assert not tasks, f"step {step} has work but ring_steps is {steps}"


def test_short_documents_end_the_ring_early():
    """One token: only ring rank 0 holds real tokens, so only the diagonal computes."""
    layout, _ = _layout(1, 4, [1])
    assert layout.ring_steps(2, True) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layout="stripe"), "need the zigzag layout, got 'stripe'"),
        (dict(layout="basic"), "need the zigzag layout, got 'basic'"),
        (dict(padded=[0, 8, 12]), "padded length 4 .* multiple of 2 \\* U \\* R = 8"),
        (dict(padded=[1, 8]), "must start at 0"),
        (dict(padded=[0, 16, 8]), "non-decreasing"),
        (dict(real=[0, 9, 10]), "document 0 has real length 9 > its padded length 8"),
        (dict(real=[0, 3]), "cu_seqlens has 2 entries but cu_seqlens_padded 3"),
        (dict(padded=[0.0, 8.0, 16.0]), "1-D integer tensor"),
    ],
)
def test_packed_layout_errors(kwargs, message):
    padded = torch.tensor(kwargs.get("padded", [0, 8, 16]))
    real = torch.tensor(kwargs.get("real", [0, 3, 9]))
    with pytest.raises(ValueError, match=message):
        get_layout(kwargs.get("layout", "zigzag"), 2, 2).packed(padded, real)


def test_packed_windows_refused():
    layout, _ = _layout(1, 2, [3])
    with pytest.raises(ValueError, match="window_size .* with packed documents"):
        layout.block_tasks(0, 0, 4, True, (2, 0))


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_packed_documents_bf16_nccl(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    per_rank = run_distributed(
        world_size, run_packed_cases, "bfloat16", "torch", "cuda", backend="nccl", timeout_s=300
    )
    failures = failed_cases(per_rank, 1e-2)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_flash_kernel_matches_reference_on_every_ring_block_pair(causal):
    """PyTorch's varlen flash op against the reference kernel on the document masks of
    every ring block pair (off-diagonal ones too, which one GPU's USP never forms)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from usp_megatron.kernels import get_kernel

    layout, cu_padded = _layout(1, 4, [1, 70, 3, 129, 33])
    block_len = int(cu_padded[-1]) // 4
    flash = get_kernel("torch_flash", "cuda", torch.bfloat16, documents=True)
    reference = get_kernel("reference", "cuda", torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(0)
    problems = []
    for r in range(4):
        for kv_rank in range(4):
            for task in layout.block_tasks(r, kv_rank, block_len, causal):
                q, dout = (torch.randn(1, block_len, 8, 64, device="cuda", generator=gen)
                           for _ in range(2))  # fmt: skip
                k, v = (torch.randn(1, block_len, 2, 64, device="cuda", generator=gen)
                        for _ in range(2))  # fmt: skip
                q, k, v, dout = (t.bfloat16() for t in (q, k, v, dout))
                out, lse = flash.forward(q, k, v, task.mask, 0.125)
                grads = flash.backward(dout, q, k, v, out, lse, task.mask, 0.125)
                want_out, want_lse = reference.forward(
                    *(t.float() for t in (q, k, v)), task.mask, 0.125
                )
                want_grads = reference.backward(
                    *(t.float() for t in (dout, q, k, v)), want_out, want_lse, task.mask, 0.125
                )
                pairs = [("out", out, want_out), ("lse", lse, want_lse)]
                pairs += list(zip(("dq", "dk", "dv"), grads, want_grads))
                for name, got, want in pairs:
                    got, want = got.float(), want.float()
                    finite = torch.isfinite(want)
                    same_inf = torch.equal(torch.isinf(got), torch.isinf(want))
                    err = (got[finite] - want[finite]).norm() / want[finite].norm().clamp_min(1)
                    if not same_inf or err > 2e-2:
                        problems.append(f"r={r} kv={kv_rank} {name}: {err:.3g} inf ok={same_inf}")
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("world_size", [2, 4])
def test_packed_documents_match_float64_document_attention(world_size):
    per_rank = run_distributed(world_size, run_packed_cases, "float32", "reference", timeout_s=300)
    assert len(per_rank[0]) >= 6 * 3, "too few cases ran"
    failures = failed_cases(per_rank, 1e-5)
    assert not failures, "\n".join(failures[:20])


def test_merge_keeps_rows_empty_on_both_sides_zero():
    """Padding rows: accumulator and block both empty (lse -inf) must stay 0, not NaN."""
    from usp_megatron.ring.merge import merge_by_lse

    out = torch.zeros(1, 3, 2, 4)
    lse = torch.tensor([[[float("-inf"), 0.5, float("-inf")]] * 2])
    block_out = torch.ones(1, 3, 2, 4)
    block_out[:, 2] = 0.0
    block_lse = torch.tensor([[[0.0, 0.5, float("-inf")]] * 2])
    merge_by_lse(out, lse, block_out, block_lse)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 2], torch.zeros(1, 2, 4))
    assert torch.isneginf(lse[:, :, 2]).all() and torch.equal(out[:, 0], torch.ones(1, 2, 4))
