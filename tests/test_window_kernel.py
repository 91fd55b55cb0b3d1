"""The tiled sliding-window kernel (kernels/windowed.py) against one kernel on the whole block.

CPU: the reference kernel plays both sub-kernels, in float64, so any error is the
decomposition's (which pieces, which rows and keys, the merge, the gradients' scatter).
GPU (marked ``gpu``): cuDNN + flash in bf16 against float64 attention, alone and inside
``LongContextAttention``.
"""

import random

import pytest
import torch
from helpers.oracle import attention_float64, rel_error

from usp_megatron.kernels import get_kernel
from usp_megatron.kernels.reference import ReferenceKernel
from usp_megatron.kernels.windowed import TiledWindowKernel, plan_band
from usp_megatron.mask import BlockMask


def _takes(sq, sk, lo, hi):
    """Every row sees a key and the last key is seen (keys before the band may be unseen)."""
    if not BlockMask(lo, hi).visible(sq, sk).any(1).all():
        return False
    try:
        BlockMask(lo, hi).flash_window(sq, sk)
    except ValueError:
        return False
    return True


def _cases():
    """(sq, sk, lo, hi, min_tile, divisor): hand-picked shapes, then a seeded sweep."""
    cases = [
        (64, 64, -16, 0, 2, 2),  # a causal window, the diagonal block
        (64, 64, -16, 0, 2, 4),  # full pieces longer than a tile (copied, index_add)
        (67, 67, -17, 0, 2, 2),  # odd band, a tail that is no tile
        (40, 40, -9, 5, 2, 2),  # a two-sided window
        (48, 64, -12, 20, 3, 2),  # sq != sk
        (64, 48, -30, 0, 2, 2),
        (16, 16, 0, 15, 2, 2),  # anti-causal square (hi cuts nothing)
        (24, 40, -5, None, 2, 2),  # hi unbounded
        (40, 24, None, 3, 2, 2),  # lo unbounded
        (30, 30, None, 0, 2, 2),  # plain causal: one call
        (12, 20, None, None, 2, 2),  # full: one call
        (3, 5, -1, 2, 1, 2),  # tiny blocks
        (1, 1, 0, 0, 1, 2),
        (2, 7, 0, 5, 1, 2),  # keys before the band's first ... none: lo = 0
        (20, 30, 4, 12, 2, 2),  # keys 0..3 seen by no row (lo > 0)
        (64, 64, -16, 0, 100, 2),  # band below min_tile: one windowed call
        (64, 64, -16, 0, 2, 1),  # divisor 1: two triangles per tile, no full piece
        (50, 50, -9, 4, 2, 1),
    ]
    rng = random.Random(19)
    while len(cases) < 80:
        sq, sk = rng.randint(1, 60), rng.randint(1, 60)
        lo = None if rng.random() < 0.2 else rng.randint(-sq // 2, 2)
        hi = None if rng.random() < 0.2 else rng.randint(-2, sk // 3)
        if _takes(sq, sk, lo, hi):
            cases.append((sq, sk, lo, hi, rng.choice([1, 2, 3]), rng.choice([1, 2, 2, 3, 4])))
    return cases


CASES = _cases()


@pytest.mark.parametrize("sq,sk,lo,hi,min_tile,divisor", CASES)
def test_plan_covers_each_visible_pair_once(sq, sk, lo, hi, min_tile, divisor):
    count = torch.zeros(sq, sk, dtype=torch.int64)
    for p in plan_band(sq, sk, lo, hi, min_tile, divisor):
        assert p.n >= 1 and p.rows >= 1 and p.keys >= 1, p
        seen = p.mask().visible(p.rows, p.keys).long()
        if p.kind == "anticausal":
            seen = torch.ones(p.rows, p.keys, dtype=torch.int64).triu()
        for t in range(p.n):
            r, c = p.q0 + t * p.rows, p.k0 + t * p.rows
            assert 0 <= r and r + p.rows <= sq and 0 <= c and c + p.keys <= sk, p
            count[r : r + p.rows, c : c + p.keys] += seen
    assert torch.equal(count, BlockMask(lo, hi).visible(sq, sk).long())


def _inputs(sq, sk, hq, hkv, seed, dtype=torch.float64, device="cpu", d=8, b=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, sk, hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(b, sq, hq, d, generator=gen, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, dout)]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("sq,sk,lo,hi,min_tile,divisor", CASES)
def test_tiled_matches_whole_block_float64(sq, sk, lo, hi, min_tile, divisor, flip):
    ref = ReferenceKernel()
    tiled = TiledWindowKernel(
        ref, ref, min_tile=min_tile, divisor=divisor, flip_triangles=flip, min_piece=1
    )
    mask = BlockMask(lo, hi)
    for seed, (hq, hkv) in enumerate([(4, 4), (4, 2), (3, 1)]):
        q, k, v, dout = _inputs(sq, sk, hq, hkv, seed + sq * 100 + sk)
        out_ref, lse_ref = ref.forward(q, k, v, mask, 0.4)
        out, lse = tiled.forward(q, k, v, mask, 0.4)
        grads_ref = ref.backward(dout, q, k, v, out_ref, lse_ref, mask, 0.4)
        grads = tiled.backward(dout, q, k, v, out_ref, lse_ref, mask, 0.4)
        errors = {"out": rel_error(out, out_ref), "lse": rel_error(lse, lse_ref)}
        errors.update({n: rel_error(g, r) for n, g, r in zip("qkv", grads, grads_ref)})
        assert out.dtype == q.dtype and lse.shape == lse_ref.shape
        assert max(errors.values()) < 1e-10, (hq, hkv, errors)


def test_tiled_on_sequence_major_views():
    """[b, s, h, d] views of [s, b, h, d] storage (what the all-to-all hands over)."""
    ref = ReferenceKernel()
    tiled = TiledWindowKernel(ref, ref, min_tile=2)
    q, k, v, dout = (x.transpose(0, 1).contiguous().transpose(0, 1)
                     for x in _inputs(50, 50, 4, 2, 7))  # fmt: skip
    mask = BlockMask(-12, 3)
    out_ref, lse_ref = ref.forward(q, k, v, mask, 0.4)
    out, lse = tiled.forward(q, k, v, mask, 0.4)
    grads = tiled.backward(dout, q, k, v, out_ref, lse_ref, mask, 0.4)
    grads_ref = ref.backward(dout, q, k, v, out_ref, lse_ref, mask, 0.4)
    assert rel_error(out, out_ref) < 1e-10 and rel_error(lse, lse_ref) < 1e-10
    assert max(rel_error(g, r) for g, r in zip(grads, grads_ref)) < 1e-10


class _Counting:
    """A kernel that counts its calls (and passes them on to the reference kernel)."""

    name, takes_windows, takes_documents = "counting", True, False

    def __init__(self):
        self.calls, self.ref = 0, ReferenceKernel()

    def available(self, device, dtype):
        return True

    def forward(self, *args):
        self.calls += 1
        return self.ref.forward(*args)

    def backward(self, *args):
        self.calls += 1
        return self.ref.backward(*args)


@pytest.mark.parametrize("lo,hi", [(-16, 0), (-16, 6)])
def test_calls_per_block_do_not_grow_with_length(lo, hi):
    calls = set()
    for length in (64, 128, 256, 512):
        dense, windowed = _Counting(), _Counting()
        tiled = TiledWindowKernel(dense, windowed, min_tile=4, min_piece=1)
        q, k, v, dout = _inputs(length, length, 2, 2, length, d=4, b=1)
        mask = BlockMask(lo, hi)
        out, lse = tiled.forward(q, k, v, mask, 0.5)
        tiled.backward(dout, q, k, v, out, lse, mask, 0.5)
        calls.add((dense.calls, windowed.calls))
        assert len(plan_band(length, length, lo, hi, 4)) <= 9
    assert len(calls) == 1, calls


def test_small_pieces_go_to_the_windowed_kernel():
    """cuDNN refuses 1 x 1 blocks: a piece below min_piece rows or keys is the windowed
    kernel's, whatever its mask (seen on an H100: 's_q = s_kv = 1 is not supported')."""
    dense, windowed = _Counting(), _Counting()
    tiled = TiledWindowKernel(dense, windowed, min_tile=4, min_piece=8)
    q, k, v, dout = _inputs(67, 67, 2, 2, 3, d=4, b=1)
    mask = BlockMask(-17, 0)
    assert min(min(p.rows, p.keys) for p in tiled.plan(67, 67, mask)) < 8
    out, lse = tiled.forward(q, k, v, mask, 0.5)
    ref_out, ref_lse = ReferenceKernel().forward(q, k, v, mask, 0.5)
    assert rel_error(out, ref_out) < 1e-10 and rel_error(lse, ref_lse) < 1e-10
    assert dense.calls and windowed.calls


def test_unbanded_blocks_are_one_dense_call_and_narrow_bands_one_windowed():
    assert [p.kind for p in plan_band(4096, 4096, None, 0, 256)] == ["causal"]
    assert [p.kind for p in plan_band(4096, 2048, None, None, 256)] == ["full"]
    assert [p.kind for p in plan_band(4096, 4096, -4095, 0, 256)] == ["causal"]  # lo cuts none
    assert [p.kind for p in plan_band(8192, 8192, -511, 0, 256)] == ["band"]  # tile 255
    # The 16K block of a 4K causal window: one causal 4K head, then 6 tiles of 2K per kind.
    kinds = [(p.kind, p.n, p.rows) for p in plan_band(16384, 16384, -4096, 0, 256)]
    assert kinds == [("causal", 6, 2048), ("anticausal", 6, 2048), ("full", 6, 2048),
                     ("causal", 1, 4096)]  # fmt: skip


def test_plan_refuses_rows_that_see_no_key():
    with pytest.raises(ValueError, match="sees no key"):
        plan_band(8, 4, -6, -1, 2)
    with pytest.raises(ValueError, match="rows that see no key"):
        plan_band(8, 16, -2, 2, 2)


# --- GPU: cuDNN + flash, bf16 -------------------------------------------------------------

GPU_SHAPES = [
    # (sq, sk, lo, hi, heads q, heads kv, head dim)
    (8192, 8192, -4096, 0, 32, 32, 128),  # the benchmark's window, 2 tiles past the head
    (12288, 12288, -4096, 0, 8, 2, 128),  # GQA
    (6144, 6144, -1024, 1024, 4, 4, 64),  # two-sided
    (3000, 3600, -700, 900, 4, 1, 128),  # sq != sk, tail rows, MQA
    (2048, 2048, 0, None, 4, 4, 128),  # an anti-causal square (a ring's previous block)
    (3000, 2500, -1000, None, 4, 2, 64),  # one-sided, hi unbounded
    (1000, 1000, -100, 0, 4, 4, 64),  # too narrow to tile: the windowed kernel alone
]


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_shapes_are_blocks_the_plan_takes(shape):
    """(On CPU: the GPU test's shapes are valid blocks, and tiled where meant to be.)"""
    pieces = plan_band(*shape[:4], 256)
    tiled, kinds = max(p.n for p in pieces) > 1, {p.kind for p in pieces}
    assert tiled == (GPU_SHAPES.index(shape) < 4), pieces
    assert (kinds == {"band"}) == (shape == GPU_SHAPES[-1]), pieces


def _gpu_reference(q, k, v, dout, mask, scale):
    """float64 attention on the GPU, one key/value head at a time: (out, lse, dq, dk, dv)."""
    group, hidden = q.shape[2] // k.shape[2], ~mask.visible(q.shape[1], k.shape[1], q.device)
    results = []
    for h in range(k.shape[2]):
        heads = slice(h * group, (h + 1) * group)
        qh, kh, vh = (x.double().requires_grad_() for x in (q[:, :, heads], k[:, :, h], v[:, :, h]))
        scores = torch.einsum("bqhd,bkd->bhqk", qh, kh).mul(scale).masked_fill(hidden, -torch.inf)
        out = torch.einsum("bhqk,bkd->bqhd", scores.softmax(-1), vh)
        out.backward(dout[:, :, heads].double())
        results.append((out.detach(), scores.logsumexp(-1).detach(), qh.grad, kh.grad, vh.grad))
        del scores, out
    out, lse, dq, dk, dv = zip(*results)
    return (torch.cat(out, 2), torch.cat(lse, 1), torch.cat(dq, 2), torch.stack(dk, 2),
            torch.stack(dv, 2))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_tiled_window_bf16(shape, flip):
    sq, sk, lo, hi, hq, hkv, d = shape
    chosen = get_kernel("torch_window", "cuda", torch.bfloat16, windows=True)
    assert isinstance(chosen, TiledWindowKernel), chosen.name
    kernel = TiledWindowKernel(chosen.dense, chosen.windowed, flip_triangles=flip)
    q, k, v, dout = _inputs(sq, sk, hq, hkv, sq + sk, torch.bfloat16, "cuda", d=d, b=1)
    mask, scale = BlockMask(lo, hi), d**-0.5
    out, lse = kernel.forward(q, k, v, mask, scale)
    grads = kernel.backward(dout, q, k, v, out, lse, mask, scale)
    del q, k, v
    torch.cuda.empty_cache()
    ref = _gpu_reference(*_inputs(sq, sk, hq, hkv, sq + sk, torch.bfloat16, "cuda", d=d, b=1),
                         mask, scale)  # fmt: skip
    errors = {n: rel_error(x, r) for n, x, r in zip(["out", "lse", "dq", "dk", "dv"],
                                                    [out, lse, *grads], ref)}  # fmt: skip
    assert max(errors.values()) < 1.5e-2, errors


@pytest.mark.gpu
@pytest.mark.parametrize("window,causal", [((1024, 0), True), ((512, 512), False)])
def test_gpu_usp_attention_window_one_gpu(window, causal):
    """``LongContextAttention`` on one GPU (backend 'torch_window': the tiled kernel)
    against float64 attention with the same window."""
    import torch.distributed as dist

    from usp_megatron import LongContextAttention, init_usp_groups

    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29541", rank=0, world_size=1)
    try:
        attn = LongContextAttention(init_usp_groups(1, 1), backend="torch_window")
        q, k, v, dout = _inputs(6144, 6144, 8, 4, 3, torch.bfloat16, "cuda", d=128, b=1)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attn(*leaves, causal=causal, window_size=window)
        out.backward(dout)
    finally:
        dist.destroy_process_group()
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attention_float64(*ref_leaves, causal=causal, window=window)
    ref.backward(dout.double())
    errors = {"out": rel_error(out, ref)}
    errors.update({n: rel_error(a.grad, r.grad) for n, a, r in zip("qkv", leaves, ref_leaves)})
    assert max(errors.values()) < 1.5e-2, errors
