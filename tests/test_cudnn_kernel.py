"""The cuDNN-frontend kernel (kernels/cudnn_frontend.py).

CPU: the masks it hands cuDNN, for every block the layouts really produce, against
``BlockMask.visible`` (cuDNN's band and ragged batch modelled as the frontend's own test
reference defines them); its graph declarations (when the frontend is installed); how
backends are chosen. GPU (marked ``gpu``): forward and backward in bf16 against float64
(the reference kernel) for full, causal, banded and packed-document blocks, views as
the all-to-all hands them over, GQA and MQA.
"""

import importlib.util
import itertools

import pytest
import torch

import usp_megatron.kernels as kernels
from usp_megatron.kernels import PREFERENCE, available_backends, get_kernel
from usp_megatron.kernels.cudnn_frontend import (
    MIN_RAGGED_LENGTH,
    BackwardSpec,
    Band,
    CudnnFrontendKernel,
    ForwardSpec,
    Geometry,
    _empty_like_rows,
    _operand,
    bshd,
    cudnn_band,
    declare_backward,
    declare_forward,
    document_tensors,
    ragged,
    ragged_batch,
)
from usp_megatron.kernels.reference import ReferenceKernel
from usp_megatron.layout import LAYOUT_NAMES, get_layout
from usp_megatron.mask import CAUSAL, FULL, BlockMask, Documents

# -- what cuDNN computes, as the frontend's test reference (test/python/test_mhas.py) says --


def band_visible(band: Band, sq: int, sk: int) -> torch.Tensor:
    """TOP_LEFT band: ``triu(1 + right)`` and ``tril(-left)`` are masked."""
    hidden = torch.zeros(sq, sk, dtype=torch.bool)
    if band.right is not None:
        hidden |= torch.ones(sq, sk, dtype=torch.bool).triu(1 + band.right)
    if band.left is not None:
        hidden |= torch.ones(sq, sk, dtype=torch.bool).tril(-band.left)
    return ~hidden


def ragged_visible(batch, causal: bool, sq: int, sk: int) -> torch.Tensor:
    """Each entry a ``max_q x max_k`` attention under the padding mask (rows and keys past
    its lengths masked), causal from its own top-left corner, placed at its first rows."""
    seen = torch.zeros(sq, sk, dtype=torch.bool)
    for n in range(batch.size):
        entry = torch.zeros(batch.max_q, batch.max_k, dtype=torch.bool)
        entry[: batch.q_lens[n], : batch.k_lens[n]] = True
        if causal:
            entry &= band_visible(Band(None, 0), batch.max_q, batch.max_k)
        q0, k0 = batch.q_rows[n], batch.k_rows[n]
        assert not entry[sq - q0 :].any() and not entry[:, sk - k0 :].any(), "past the block"
        rows = entry[: sq - q0, : sk - k0]
        seen[q0 : q0 + rows.shape[0], k0 : k0 + rows.shape[1]] |= rows
    return seen


# -- CPU: bands ----------------------------------------------------------------------------

DEGREES = [(1, 2), (2, 2), (1, 4), (2, 4)]


def _windows(seq_len: int) -> list[tuple[tuple[int, int], bool]]:
    """(window, causal): smaller than a chunk, spanning chunks, larger than the sequence,
    causal and two-sided."""
    windows = [(2, 0), (seq_len // 3, 0), (2 * seq_len, 0), (3, 2), (seq_len // 3, seq_len // 5),
               (2 * seq_len, 2 * seq_len)]  # fmt: skip
    return [(w, causal) for w in windows for causal in (True, False)]


@pytest.mark.parametrize("impl", LAYOUT_NAMES)
def test_band_of_every_layout_task_sees_what_the_mask_sees(impl):
    kinds = set()
    for (ulysses, ring), per_rank in itertools.product(DEGREES, (8, 12)):
        layout = get_layout(impl, ulysses, ring)
        seq_len = per_rank * ulysses * ring
        block_len = seq_len // ring
        for (window, causal), r, kv in itertools.product(
            _windows(seq_len), range(ring), range(ring)
        ):
            for task in layout.block_tasks(r, kv, block_len, causal, window):
                sq, sk = len(range(block_len)[task.q_rows]), len(range(block_len)[task.kv_rows])
                band = cudnn_band(task.mask.lo, task.mask.hi, sq, sk)
                assert torch.equal(band_visible(band, sq, sk), task.mask.visible(sq, sk)), (
                    impl, ulysses, ring, window, causal, r, kv, task, band
                )  # fmt: skip
                kinds.add((band.left is not None, band.right is not None))
    assert {(False, True), (True, True)} <= kinds, kinds  # causal and two-bounded bands ran


def test_band_drops_bounds_that_cut_nothing():
    assert cudnn_band(None, None, 8, 12) == Band(None, None)
    assert cudnn_band(None, 0, 8, 8) == Band(None, 0)  # causal
    assert cudnn_band(-7, 7, 8, 8) == Band(None, None)
    assert cudnn_band(-3, 0, 8, 8) == Band(4, 0)  # query i sees keys i-3 .. i
    assert cudnn_band(-3, 10, 8, 12) == Band(4, 10)
    assert cudnn_band(0, None, 8, 8) == Band(1, None)  # the anti-causal square


@pytest.mark.parametrize(
    "lo,hi,sq,sk,message",
    [(2, 5, 8, 8, "keys 0..1 are seen by no row"), (-3, -1, 8, 8, "row 0 sees no key"),
     (-12, 0, 16, 8, "no more query rows than keys")],
)  # fmt: skip
def test_band_refuses_untrimmed_blocks(lo, hi, sq, sk, message):
    with pytest.raises(ValueError, match=message):
        cudnn_band(lo, hi, sq, sk)


# -- CPU: packed documents -----------------------------------------------------------------

REAL_LENGTHS = [[1], [5, 1, 17, 2], [1, 1, 1, 2, 0, 3], [0, 40, 1, 0, 130, 9]]


def _packed(ulysses, ring, real):
    cp = ulysses * ring
    padded = [max(2 * cp, -(-n // (2 * cp)) * 2 * cp) for n in real]
    cu = torch.tensor([0, *itertools.accumulate(real)])
    cu_padded = torch.tensor([0, *itertools.accumulate(padded)])
    return get_layout("zigzag", ulysses, ring).packed(cu_padded, cu), int(cu_padded[-1])


@pytest.mark.parametrize("ulysses,ring", [(1, 1), (1, 2), (2, 2), (1, 4), (2, 3)])
def test_ragged_batch_of_every_packed_task_sees_what_the_mask_sees(ulysses, ring):
    checked = 0
    for real, causal in itertools.product(REAL_LENGTHS, (True, False)):
        layout, seq_len = _packed(ulysses, ring, real)
        block_len = seq_len // ring
        for r, kv in itertools.product(range(ring), range(ring)):
            for task in layout.block_tasks(r, kv, block_len, causal):
                documents = task.mask.documents
                batch = ragged_batch(documents)
                n = len(documents.q_lens)
                assert batch.size >= n and batch.size & (batch.size - 1) == 0
                assert batch.q_lens[n:] == (0,) * (batch.size - n) == batch.k_lens[n:]
                assert len(batch.q_rows) == len(batch.k_rows) == batch.size + 1
                assert batch.max_q >= max(MIN_RAGGED_LENGTH, *documents.q_lens)
                seen = ragged_visible(batch, documents.causal, block_len, block_len)
                assert torch.equal(seen, task.mask.visible(block_len, block_len)), (real, r, kv)
                checked += 1
    assert checked >= len(REAL_LENGTHS) * ring


def test_ragged_batch_buckets_and_pads():
    documents = Documents((0, 10, 30), (5, 20, 3), (0, 10, 30), (5, 20, 3), causal=True)
    batch = ragged_batch(documents)
    assert batch.size == 4 and (batch.max_q, batch.max_k) == (64, 64)
    assert batch.q_lens == (5, 20, 3, 0) and batch.q_rows == (0, 10, 30, 33, 33)
    long = Documents((0, 100), (70, 300), (2, 80), (77, 200), causal=False)
    assert ragged_batch(long)[:3] == (2, 512, 256)


def test_ragged_batch_refuses_segments_out_of_row_order():
    documents = Documents((10, 0), (5, 5), (10, 0), (5, 5), causal=True)
    with pytest.raises(ValueError, match="in row order"):
        ragged_batch(documents)


def test_document_tensors_are_built_once_per_documents_and_stride():
    documents = Documents((0, 10, 30), (5, 20, 3), (0, 10, 30), (5, 20, 3), causal=True)
    tensors = document_tensors(documents, torch.device("cpu"))
    assert document_tensors(documents, torch.device("cpu")) is tensors
    assert tensors.q_lens.flatten().tolist() == [5, 20, 3, 0]
    assert tensors.q_lens.dtype == torch.int32 and tensors.q_lens.shape == (4, 1, 1, 1)
    offsets = tensors.offsets("q", 384)
    assert offsets.shape == (5, 1, 1, 1) and offsets.dtype == torch.int64
    assert offsets.flatten().tolist() == [0, 3840, 11520, 12672, 12672]
    assert tensors.offsets("q", 384) is offsets and tensors.offsets("k", 384) is not offsets


# -- CPU: operands, geometry, graph declarations -------------------------------------------


def test_operands_are_used_in_place_when_aligned_and_copied_otherwise():
    qkv = torch.zeros(2, 16, 12, 64, dtype=torch.bfloat16)  # q, k, v heads side by side
    head_slice = qkv[:, :, 4:8]
    assert _operand(head_slice).data_ptr() == head_slice.data_ptr()
    seq_major = torch.zeros(16, 2, 4, 64, dtype=torch.bfloat16).transpose(0, 1)
    assert _operand(seq_major[:, 3:9]).data_ptr() == seq_major[:, 3:9].data_ptr()
    expanded = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16).expand(2, 16, 4, 64)
    assert _operand(expanded).is_contiguous()
    odd_heads = torch.zeros(1, 8, 4, 12, dtype=torch.bfloat16)[..., :8]  # heads 24 bytes apart
    copied = _operand(odd_heads)
    assert copied.is_contiguous() and copied.data_ptr() != odd_heads.data_ptr()
    assert torch.equal(copied, odd_heads)
    out = _empty_like_rows(seq_major, (2, 16, 6, 64))
    assert out.shape == (2, 16, 6, 64) and out.transpose(0, 1).is_contiguous()
    assert _empty_like_rows(head_slice, (2, 16, 6, 64)).is_contiguous()


def test_geometry_is_the_tensor_seen_as_bhsd():
    view = torch.zeros(16, 1, 12, 64).transpose(0, 1)[:, :, 4:8]  # [1, 16, 4, 64]
    geometry = bshd(view.shape, view.stride())
    assert geometry == Geometry((1, 4, 16, 64), (16 * 768, 64, 768, 1))
    assert ragged(4, 64, 4, 64, 768, 64) == Geometry((4, 4, 64, 64), (64 * 768, 64, 768, 1))


def _frontend_declares_on_cpu() -> bool:
    """The frontend's graphs are Python objects up to ``validate()`` (1.28; older ones
    create a cuDNN handle in the constructor)."""
    if importlib.util.find_spec("cudnn") is None:
        return False
    import cudnn

    try:
        cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16)
    except RuntimeError:
        return False
    return True


needs_frontend = pytest.mark.skipif(
    not _frontend_declares_on_cpu(),
    reason="the cuDNN frontend (pip install 'usp_megatron[cudnn]') declares graphs on CPU "
    "from 1.28 on; absent or older here",
)


@needs_frontend
def test_forward_graph_declares_the_band_and_the_strides():
    import cudnn

    q = torch.zeros(16, 1, 12, 64).transpose(0, 1)[:, :, 0:8]
    k = torch.zeros(1, 16, 2, 64)
    spec = ForwardSpec(torch.bfloat16, bshd(q.shape, q.stride()), bshd(k.shape, k.stride()),
                       bshd(k.shape, k.stride()), bshd((1, 16, 8, 64), (8192, 512, 64, 1)),
                       Geometry((1, 8, 16, 1), (128, 16, 1, 1)), cudnn_band(-5, 0, 16, 16),
                       0.125, False)  # fmt: skip
    graph, tensors = declare_forward(cudnn, spec)
    (node,) = graph.nodes
    assert node.params["diagonal_band_left_bound"] == 6
    assert node.params["diagonal_band_right_bound"] == 0
    assert node.params["diagonal_alignment"] == cudnn.diagonal_alignment.TOP_LEFT
    assert node.params["generate_stats"] is True and node.params["attn_scale"] == 0.125
    assert "use_padding_mask" not in node.params
    assert tuple(tensors["q"].dim) == (1, 8, 16, 64)
    assert tuple(tensors["q"].stride) == (16 * 768, 64, 768, 1)
    assert tuple(tensors["o"].stride) == (8192, 64, 512, 1) and not tensors["o"].is_virtual
    assert tuple(tensors["stats"].dim) == (1, 8, 16, 1)


@needs_frontend
def test_backward_graph_declares_ragged_offsets_on_every_tensor():
    import cudnn

    n, m, hq, hkv, d = 4, 64, 8, 2, 64
    q_side, k_side = ragged(n, m, hq, d, hq * d, d), ragged(n, m, hkv, d, hkv * d, d)
    spec = BackwardSpec(torch.float16, q_side, k_side, k_side, q_side, q_side,
                        ragged(n, m, hq, 1, hq, 1), ragged(n, m, hq, d, hq * d, d),
                        ragged(n, m, hkv, d, hkv * d, d), ragged(n, m, hkv, d, hkv * d, d),
                        Band(None, 0), 0.125, True, (128, 128))  # fmt: skip
    graph, tensors = declare_backward(cudnn, spec)
    (node,) = graph.nodes
    assert node.params["use_padding_mask"] is True and node.params["diagonal_band_right_bound"] == 0
    assert (node.params["max_total_seq_len_q"], node.params["max_total_seq_len_kv"]) == (128, 128)
    # paired as TransformerEngine's THD graphs pair them
    shared = {"q": "q", "dq": "q", "k": "k", "dk": "k", "v": "v", "dv": "v", "o": "o",
              "d_o": "o", "stats": "stats"}  # fmt: skip
    for role, owner in shared.items():
        assert tensors[role].ragged_offset is tensors[f"{owner}_offsets"], role
        assert tuple(tensors[f"{owner}_offsets"].dim) == (n + 1, 1, 1, 1)
    assert tuple(tensors["q_lens"].dim) == (n, 1, 1, 1)
    assert tuple(tensors["stats"].stride) == (m * hq, 1, hq, 1)  # token-major, as TE's


def _recorded_calls(monkeypatch, calls):
    """Run ``calls(kernel)`` with graphs that record (spec, buffers) instead of running."""
    import usp_megatron.kernels.cudnn_frontend as frontend

    recorded = []

    class Recording:
        def __init__(self, spec):
            self.spec = spec

        def run(self, buffers):
            recorded.append((self.spec, buffers))

    monkeypatch.setattr(frontend._GraphCache, "get", lambda self, index, spec: Recording(spec))
    monkeypatch.setattr(frontend, "_device_index", lambda x: 0)
    calls(CudnnFrontendKernel())
    return recorded


def _blocks(kernel):
    """A banded block and a packed-documents block, as the all-to-all hands them over
    (head slices of one sequence-major buffer), forward and backward."""
    qkv = torch.zeros(96, 1, 12, 64, dtype=torch.bfloat16).transpose(0, 1)
    q, k, v = qkv[:, :, :8], qkv[:, :, 8:10], qkv[:, :, 10:12]
    dout = torch.zeros(1, 96, 8, 64, dtype=torch.bfloat16)
    documents = Documents((0, 40), (30, 56), (0, 40), (30, 56), causal=True)
    for mask in (BlockMask(-20, 0), BlockMask(documents=documents)):
        out, lse = kernel.forward(q, k, v, mask, 0.125)
        kernel.backward(dout, q, k, v, out, lse, mask, 0.125)


ROLES = {
    (False, False): {"q", "k", "v", "o", "stats"},
    (False, True): {"q", "k", "v", "o", "d_o", "stats", "dq", "dk", "dv"},
}
ROLES[True, False] = ROLES[False, False] | {"q_lens", "k_lens", "q_offsets", "k_offsets",
                                            "v_offsets", "o_offsets", "stats_offsets"}  # fmt: skip
ROLES[True, True] = ROLES[False, True] | ROLES[True, False] - ROLES[False, False]


def test_every_call_binds_each_graph_tensor_to_a_buffer_of_its_geometry(monkeypatch):
    """The per-call path on CPU (graphs recorded, not run): every role of the graph gets a
    buffer; dense buffers have the graph's [b, h, s, d] shape and strides; ragged ones the
    graph's row and head strides, and their offsets are their rows times their row stride
    (paired tensors sharing one)."""
    recorded = _recorded_calls(monkeypatch, _blocks)
    assert len(recorded) == 4
    for spec, buffers in recorded:
        backward = isinstance(spec, BackwardSpec)
        assert set(buffers) == ROLES[spec.ragged, backward], (spec.ragged, backward)
        for role, buffer in buffers.items():
            geometry = getattr(spec, role, None)
            if not isinstance(geometry, Geometry):
                continue
            if not spec.ragged:
                assert tuple(buffer.shape) == geometry.dim, role
                assert all(st == want for st, want, n in zip(buffer.stride(), geometry.stride,
                           geometry.dim) if n > 1), (role, buffer.stride(), geometry)  # fmt: skip
            elif role != "stats":
                assert (buffer.stride(1), buffer.stride(2)) == geometry.stride[2:0:-1], role
        if spec.ragged:
            batch = ragged_batch(Documents((0, 40), (30, 56), (0, 40), (30, 56), causal=True))
            owner = {"q": "q", "k": "k", "v": "v", "o": "o"}
            if backward:
                owner.update(d_o="o", dq="q", dk="k", dv="v")
            for role, offsets_of in owner.items():
                rows = batch.k_rows if offsets_of in ("k", "v") else batch.q_rows
                want = [r * buffers[role].stride(1) for r in rows]
                assert buffers[f"{offsets_of}_offsets"].flatten().tolist() == want, role
            stats_rows = [r * 8 for r in batch.q_rows]
            assert buffers["stats_offsets"].flatten().tolist() == stats_rows


@needs_frontend
def test_recorded_calls_bind_exactly_the_declared_graph_tensors(monkeypatch):
    import cudnn

    for spec, buffers in _recorded_calls(monkeypatch, _blocks):
        declare = declare_backward if isinstance(spec, BackwardSpec) else declare_forward
        _, tensors = declare(cudnn, spec)
        assert set(tensors) == set(buffers)


# -- CPU: choosing the kernel --------------------------------------------------------------


def test_cudnn_is_cuda_only_and_cpu_choices_are_unchanged():
    kernel = CudnnFrontendKernel()
    assert not kernel.available(torch.device("cpu"), torch.bfloat16)
    assert not kernel.available(torch.device("cuda"), torch.float32)  # no CUDA call made
    for windows, documents in ((False, False), (True, False), (False, True)):
        assert get_kernel("auto", "cpu", torch.float32, windows, documents).name == "reference"
    assert available_backends("cpu", torch.float32) == ["reference"]
    with pytest.raises(ValueError, match="cannot run on device cpu"):
        get_kernel("cudnn", "cpu", torch.bfloat16)


def test_preference_table():
    for family in ("auto", "torch"):
        assert PREFERENCE[family]["dense"][0] == "torch_cudnn"
        assert PREFERENCE[family]["windows"][0] == "cudnn"
        assert PREFERENCE[family]["documents"][0] == "cudnn"
    assert all(PREFERENCE["auto"][kind][-1] == "reference" for kind in PREFERENCE["auto"])


@pytest.fixture
def all_cuda_kernels_available(monkeypatch):
    """Every kernel available on CUDA (none on CPU), whatever this machine has."""
    for kernel in kernels._KERNELS.values():
        monkeypatch.setattr(kernel, "available", lambda device, dtype: device.type == "cuda")
    return monkeypatch


def test_windows_and_documents_pick_cudnn_dense_keeps_torch_cudnn(all_cuda_kernels_available):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    for family in ("auto", "torch"):
        assert get_kernel(family, cuda, bf16).name == "torch_cudnn"
        assert get_kernel(family, cuda, bf16, windows=True).name == "cudnn"
        assert get_kernel(family, cuda, bf16, documents=True).name == "cudnn"
    for windows, documents in ((False, False), (True, False), (False, True)):
        assert get_kernel("cudnn", cuda, bf16, windows, documents).name == "cudnn"
    cudnn_kernel = kernels._KERNELS["cudnn"]
    all_cuda_kernels_available.setattr(cudnn_kernel, "available", lambda device, dtype: False)
    assert get_kernel("auto", cuda, bf16, windows=True).name == "torch_window"
    assert get_kernel("torch", cuda, bf16, documents=True).name == "torch_flash"
    with pytest.raises(ValueError, match="no sliding-window kernel"):
        get_kernel("torch_cudnn", cuda, bf16, windows=True)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 7), (7, 1)])
def test_blocks_of_one_row_or_one_key_go_to_the_plain_kernel(sq, sk):
    """cuDNN's backward refuses s_q = s_kv = 1 and PyTorch keeps sequence length 1 off
    cuDNN; such blocks need no CUDA here."""
    gen = torch.Generator().manual_seed(5)
    q, dout = (torch.randn(2, sq, 4, 8, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, sk, 2, 8, generator=gen) for _ in range(2))
    kernel, reference = CudnnFrontendKernel(), ReferenceKernel()
    out, lse = kernel.forward(q, k, v, FULL, 0.5)
    want_out, want_lse = reference.forward(q, k, v, FULL, 0.5)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    grads = kernel.backward(dout, q, k, v, out, lse, FULL, 0.5)
    want = reference.backward(dout, q, k, v, out, lse, FULL, 0.5)
    assert all(torch.equal(g, w) for g, w in zip(grads, want))


# -- GPU: bf16 against float64 -------------------------------------------------------------

TOL = 1e-2


def _views(x: torch.Tensor, layout: str, heads_before: int = 3) -> torch.Tensor:
    """``x`` [b, s, h, d] stored as the all-to-all hands it over: ``bshd`` as is,
    ``seq_major`` in [s, b, h, d] storage, ``head_slice`` heads of a wider buffer."""
    if layout == "seq_major":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "head_slice":
        b, s, h, d = x.shape
        wide = torch.zeros(s, b, heads_before + h + 2, d, dtype=x.dtype, device=x.device)
        wide[:, :, heads_before : heads_before + h] = x.transpose(0, 1)
        return wide.transpose(0, 1)[:, :, heads_before : heads_before + h]
    return x


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| relative to ||want||, absolute where ||want|| < 1 (a block whose rows
    each see one key has dq = 0, which no relative error can measure); inf if not finite."""
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1.0))


def _compare(kernel, q, k, v, dout, mask, scale=0.125):
    """Errors of ``kernel`` (its own out and lse fed to its backward) against the float64
    reference kernel, and the rows that see nothing (documents): out, lse, dq exactly
    0 / -inf / 0 there, keys seen by nothing exactly 0 in dk, dv."""
    reference = ReferenceKernel()
    q64, k64, v64, dout64 = (x.double() for x in (q, k, v, dout))
    want_out, want_lse = reference.forward(q64, k64, v64, mask, scale)
    want = reference.backward(dout64, q64, k64, v64, want_out, want_lse, mask, scale)
    out, lse = kernel.forward(q, k, v, mask, scale)
    grads = kernel.backward(dout, q, k, v, out, lse, mask, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == want_lse.shape
    seen = mask.visible(q.shape[1], k.shape[1], q.device)
    rows, keys = seen.any(1), seen.any(0)
    errors = {"out": _error(out[:, rows], want_out[:, rows]),
              "lse": _error(lse[:, :, rows], want_lse[:, :, rows])}  # fmt: skip
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want):
        assert got.shape == expected.shape and got.dtype == q.dtype, name
        errors[name] = _error(got, expected)
    unseen = {
        "out": out[:, ~rows], "dq": grads[0][:, ~rows], "dk": grads[1][:, ~keys],
        "dv": grads[2][:, ~keys],
    }  # fmt: skip
    for name, tensor in unseen.items():
        errors[f"{name} at padding"] = float(tensor.abs().max()) if tensor.numel() else 0.0
    lse_padding = lse[:, :, ~rows]
    errors["lse at padding"] = 0.0 if bool(torch.isneginf(lse_padding).all()) else float("inf")
    return errors


def _assert_close(errors, context):
    bad = {n: e for n, e in errors.items() if (e != 0.0 if "padding" in n else not e < TOL)}
    assert not bad, (context, errors)


def _inputs(b, sq, sk, hq, hkv, d, seed, layout="bshd"):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(s, h):
        x = torch.randn(b, s, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        return _views(x, layout)

    return rand(sq, hq), rand(sk, hkv), rand(sk, hkv), rand(sq, hq)


def _cudnn():
    assert "cudnn" in available_backends("cuda", torch.bfloat16), "the cudnn kernel is unavailable"
    return get_kernel("cudnn", "cuda", torch.bfloat16, windows=True, documents=True)


DENSE_CASES = [
    # (b, sq, sk, mask, hq, hkv, d)
    (2, 256, 256, CAUSAL, 8, 8, 128),
    (2, 256, 256, FULL, 8, 2, 128),
    (1, 192, 320, FULL, 8, 1, 64),  # sq != sk
    (2, 320, 192, CAUSAL, 4, 2, 64),  # causal from the top-left corner, sq > sk
    (1, 512, 512, BlockMask(-100, 0), 8, 2, 128),  # a causal window
    (2, 384, 384, BlockMask(-64, 32), 4, 4, 64),  # two-sided
    (1, 300, 300, BlockMask(0, None), 4, 1, 128),  # the anti-causal square (a window's edge)
    (1, 200, 260, BlockMask(-30, 80), 8, 4, 64),  # sq < sk, both bounds
    (1, 1, 1, FULL, 4, 2, 64),  # one row, one key: the plain kernel
    (1, 1, 96, FULL, 4, 2, 64),  # a single query row: the plain kernel too
    (1, 2, 96, BlockMask(0, 94), 4, 2, 64),  # two rows
    (1, 96, 2, CAUSAL, 4, 2, 64),  # two keys
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "seq_major", "head_slice"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"{c[1]}x{c[2]}-{c[3]}-{c[4]}/{c[5]}")
def test_gpu_dense_and_banded_blocks(case, layout):
    b, sq, sk, mask, hq, hkv, d = case
    q, k, v, dout = _inputs(b, sq, sk, hq, hkv, d, sq * 31 + sk, layout)
    _assert_close(_compare(_cudnn(), q, k, v, dout, mask), (case, layout))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", LAYOUT_NAMES)
@pytest.mark.parametrize("window,causal", [((300, 0), True), ((90, 0), True), ((120, 70), False)])
def test_gpu_every_banded_task_of_a_ring(impl, window, causal):
    """Every block task of a 4-rank ring with a window (row and key slices of the ring
    blocks, as the ring passes them), GQA."""
    layout, block_len, kernel = get_layout(impl, 1, 4), 512, _cudnn()
    q, k, v, dout = _inputs(1, block_len, block_len, 8, 2, 64, 7, "head_slice")
    for r, kv in itertools.product(range(4), range(4)):
        for task in layout.block_tasks(r, kv, block_len, causal, window):
            rows, keys = task.q_rows, task.kv_rows
            errors = _compare(kernel, q[:, rows], k[:, keys], v[:, keys], dout[:, rows],
                              task.mask)  # fmt: skip
            _assert_close(errors, (r, kv, task))


@pytest.mark.gpu
@pytest.mark.parametrize("heads,layout_kind", [((8, 8), "bshd"), ((8, 2), "head_slice"),
                                               ((8, 1), "seq_major")])  # fmt: skip
@pytest.mark.parametrize("ring", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_packed_documents(causal, ring, heads, layout_kind):
    """Every ring block pair's document task (empty and one-token documents among them):
    real rows against float64, padding rows exactly 0 (and lse -inf), never NaN."""
    kernel, (hq, hkv) = _cudnn(), heads
    for real in ([1, 70, 0, 3, 129, 33], [1, 1, 2, 0, 1], [500]):
        layout, seq_len = _packed(1, ring, real)
        block_len = seq_len // ring
        q, k, v, dout = _inputs(1, block_len, block_len, hq, hkv, 64, seq_len, layout_kind)
        for r, kv in itertools.product(range(ring), range(ring)):
            for task in layout.block_tasks(r, kv, block_len, causal):
                _assert_close(_compare(kernel, q, k, v, dout, task.mask), (real, r, kv))


@pytest.mark.gpu
def test_gpu_backends_pick_cudnn_for_windows_and_documents():
    assert CudnnFrontendKernel().available(torch.device("cuda"), torch.bfloat16)
    for family in ("auto", "torch"):
        assert get_kernel(family, "cuda", torch.bfloat16, windows=True).name == "cudnn"
        assert get_kernel(family, "cuda", torch.bfloat16, documents=True).name == "cudnn"
        assert get_kernel(family, "cuda", torch.bfloat16).name == "torch_cudnn"
