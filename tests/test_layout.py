"""The sequence layout: partitions, Megatron's zigzag split, ring blocks, piece order."""

import pytest
import torch

from usp_megatron.layout import LAYOUT_NAMES, get_layout, local_positions

DEGREES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (8, 1), (1, 8), (3, 2)]


@pytest.mark.parametrize("impl", LAYOUT_NAMES)
@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_local_positions_partition_the_sequence(impl, ulysses, ring):
    seq_len = 2 * ulysses * ring * 3
    held = [
        local_positions(seq_len, ulysses, ring, u, r, impl)
        for r in range(ring)
        for u in range(ulysses)
    ]
    assert all(len(p) == seq_len // (ulysses * ring) for p in held)
    assert torch.equal(torch.cat(held).sort().values, torch.arange(seq_len))


@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_zigzag_is_megatron_context_parallel_split(ulysses, ring):
    """Megatron: CP rank c takes chunks c and 2C-1-c of 2C (get_batch_on_this_cp_rank)."""
    cp = ulysses * ring
    seq_len = 2 * cp * 5
    chunks = torch.arange(seq_len).view(2 * cp, -1)
    for c in range(cp):
        expected = torch.cat([chunks[c], chunks[2 * cp - 1 - c]])
        got = local_positions(seq_len, ulysses, ring, c % ulysses, c // ulysses, "zigzag")
        assert torch.equal(got, expected)


@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_ring_blocks(ulysses, ring):
    seq_len = 2 * ulysses * ring * 2
    for r in range(ring):
        stripe = get_layout("stripe", ulysses, ring).ring_block_positions(seq_len, r)
        assert torch.equal(stripe, torch.arange(r, seq_len, ring))
        basic = get_layout("basic", ulysses, ring).ring_block_positions(seq_len, r)
        assert torch.equal(basic, torch.arange(seq_len).view(ring, -1)[r])
        zigzag = get_layout("zigzag", ulysses, ring).ring_block_positions(seq_len, r)
        chunks = torch.arange(seq_len).view(2 * ring, -1)
        assert torch.equal(zigzag, torch.cat([chunks[r], chunks[2 * ring - 1 - r]]))


@pytest.mark.parametrize("impl", LAYOUT_NAMES)
@pytest.mark.parametrize("ulysses,ring", DEGREES)
def test_gather_piece_order_sorts_every_ring_block(impl, ulysses, ring):
    """The reorder after the all-to-all yields the ring block in position order."""
    seq_len = 2 * ulysses * ring * 3
    layout = get_layout(impl, ulysses, ring)
    k = layout.pieces_per_rank
    order = layout.gather_order
    for r in range(ring):
        pieces = [
            piece
            for u in range(ulysses)
            for piece in local_positions(seq_len, ulysses, ring, u, r, impl).chunk(k)
        ]
        reordered = torch.cat([pieces[i] for i in order])
        assert torch.equal(reordered, layout.ring_block_positions(seq_len, r))


def test_zigzag_piece_order_matches_design():
    """A_0..A_{U-1}, B_{U-1}..B_0 where rank u holds (A_u, B_u)."""
    assert get_layout("zigzag", 4, 1).gather_order == [0, 2, 4, 6, 7, 5, 3, 1]
    assert get_layout("stripe", 4, 1).gather_order == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        ((12, 2, 2, 0, 0, "zigzag"), "multiple of 2 \\* U \\* R = 8"),
        ((10, 2, 2, 0, 0, "stripe"), "multiple of U \\* R = 4"),
        ((8, 2, 2, 0, 0, "spiral"), "layout must be one of"),
        ((8, 0, 2, 0, 0, "basic"), "ulysses_degree must be an integer >= 1"),
        ((8, 2, 2, 2, 0, "basic"), "ulysses_rank 2 not in"),
    ],
)
def test_layout_errors(args, message):
    with pytest.raises(ValueError, match=message):
        local_positions(*args)


WINDOWS = [(0, 0), (1, 0), (3, 2), (5, -1), (-1, 4), (7, 7), (40, 40)]


def _visible_from_tasks(tasks, block_len):
    """The [block_len, block_len] visibility the tasks compute, counting overlaps."""
    seen = torch.zeros(block_len, block_len, dtype=torch.int64)
    for task in tasks:
        rows = torch.arange(block_len)[task.q_rows]
        cols = torch.arange(block_len)[task.kv_rows]
        mask = task.mask.visible(len(rows), len(cols))
        assert mask.any(1).all() and mask.any(0).all(), f"empty row or column in {task}"
        seen[rows[:, None], cols[None, :]] += mask.long()
    return seen


@pytest.mark.parametrize("impl", LAYOUT_NAMES)
@pytest.mark.parametrize("ulysses,ring", [(1, 1), (1, 2), (2, 2), (1, 4), (2, 3)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, *WINDOWS])
def test_block_tasks_compute_exactly_the_mask(impl, ulysses, ring, causal, window):
    """Every ring block pair's tasks cover exactly the (windowed, causal) visibility of
    their global positions, once, with no empty rows; steps after ring_steps have none."""
    layout = get_layout(impl, ulysses, ring)
    seq_len = layout.sequence_multiple * 4
    block_len = seq_len // ring
    steps = layout.ring_steps(block_len, causal, window)
    for r in range(ring):
        q_pos = layout.ring_block_positions(seq_len, r)
        for step in range(ring):
            kv_rank = (r - step) % ring
            k_pos = layout.ring_block_positions(seq_len, kv_rank)
            offset = k_pos[None, :] - q_pos[:, None]
            want = torch.ones_like(offset, dtype=torch.bool)
            if causal:
                want &= offset <= 0
            if window is not None:
                left, right = window
                want &= (offset >= -left) if left >= 0 else want
                want &= (offset <= right) if right >= 0 else want
            tasks = layout.block_tasks(r, kv_rank, block_len, causal, window)
            got = _visible_from_tasks(tasks, block_len)
            assert torch.equal(got, want.long()), (r, kv_rank)
            if step >= steps:
                assert not tasks, f"step {step} has work but ring_steps is {steps}"


def test_windowed_basic_ring_ends_early():
    """A window inside one block needs the diagonal and the previous block only."""
    layout = get_layout("basic", 1, 8)
    assert layout.ring_steps(16, True, (4, 0)) == 2
    assert layout.ring_steps(16, True, None) == 8
    assert layout.ring_steps(16, True, (40, 0)) == 4


@pytest.mark.parametrize("bad", [(1,), (1, -2), (1.5, 0), "left", (True, 0)])
def test_window_errors(bad):
    from usp_megatron.checks import check_window

    with pytest.raises(ValueError, match="window_size must be"):
        check_window(bad)


def test_shard_and_gather_need_the_layout():
    """A shard cut with a default layout while the module attends with another was silently
    wrong (a stripe module fed zigzag shards: 2.55 off); the layout is now required, and an
    object for other degrees is refused."""
    from usp_megatron import USPGroups, gather_sequence, shard_sequence

    groups = USPGroups(None, None, 2, 2, 1, 0)
    x = torch.arange(16.0)[None]
    with pytest.raises(TypeError, match="layout"):
        shard_sequence(x, 1, groups)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="layout"):
        gather_sequence(x, 1, groups)  # type: ignore[call-arg]
    stripe = get_layout("stripe", 2, 2)
    assert torch.equal(shard_sequence(x, 1, groups, stripe)[0], stripe.positions(16, 1, 0).float())
    with pytest.raises(ValueError, match="is for ulysses degree 4 x ring degree 1"):
        shard_sequence(x, 1, groups, get_layout("stripe", 4, 1))
