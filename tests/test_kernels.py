"""Every kernel backend present against exact float64 attention: output, lse, gradients."""

import pytest
import torch
from helpers.oracle import attention_float64, rel_error

from usp_megatron.kernels import BACKENDS, available_backends, get_kernel
from usp_megatron.mask import CAUSAL, FULL, BlockMask

HEADS = [(4, 4), (4, 2), (4, 1)]


def _seq_major(t):
    """The same values stored [s, b, h, d]: what the ulysses all-to-all hands the kernels."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _check_kernel(kernel, device, dtype, hq, hkv, causal, tol, sq=48, sk=48, d=32, layout="bshd"):
    gen = torch.Generator().manual_seed(hq * 100 + hkv * 10 + causal)
    q = torch.randn(2, sq, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(2, sk, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, sk, hkv, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(2, sq, hq, d, generator=gen, dtype=torch.float64)
    scale = 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_float64(*leaves, causal=causal, scale=scale)
    ref.backward(dout)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(hq // hkv, dim=2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
    ref_lse = scores.logsumexp(-1)

    to = dict(device=device, dtype=dtype)
    lay = _seq_major if layout == "seq_major" else (lambda t: t)
    qd, kd, vd, doutd = (lay(t.to(**to)) for t in (q, k, v, dout))
    mask = CAUSAL if causal else FULL
    out, lse = kernel.forward(qd, kd, vd, mask, scale)
    assert out.shape == (2, sq, hq, d) and out.dtype == dtype
    assert lse.shape == (2, hq, sq) and lse.dtype in (torch.float32, torch.float64)
    dq, dk, dv = kernel.backward(doutd, qd, kd, vd, lay(out), lse, mask, scale)
    errors = {
        "out": rel_error(out, ref),
        "lse": rel_error(lse, ref_lse),
        "dq": rel_error(dq, leaves[0].grad),
        "dk": rel_error(dk, leaves[1].grad),
        "dv": rel_error(dv, leaves[2].grad),
    }
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("layout", ["bshd", "seq_major"])
def test_reference_kernel_cpu(layout, dtype, tol, hq, hkv, causal):
    kernel = get_kernel("reference", "cpu", dtype)
    _check_kernel(kernel, "cpu", dtype, hq, hkv, causal, tol, layout=layout)


def test_auto_is_reference_on_cpu():
    assert get_kernel("auto", "cpu", torch.float32).name == "reference"
    assert available_backends("cpu", torch.float32) == ["reference"]


def test_backend_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        get_kernel("cutlass", "cpu", torch.float32)
    with pytest.raises(ValueError, match="cannot run on device cpu"):
        get_kernel("torch_cudnn", "cpu", torch.bfloat16)


def test_block_rows_must_see_a_key():
    """A mask is a band from the top-left corner; one that leaves a row or the last key
    empty is refused (the layout trims blocks so it never hands one out)."""
    x = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="rows that see no key"):
        get_kernel("reference", "cpu", torch.float32).forward(x[:, :4], x, x, BlockMask(-1, 1), 1.0)


GPU_BACKENDS = [b for b in BACKENDS if b not in ("auto", "reference")]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "seq_major"])
def test_gpu_kernels_bf16(layout, backend, hq, hkv, causal):
    if backend not in available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} is not available on this machine")
    kernel = get_kernel(backend, "cuda", torch.bfloat16)
    _check_kernel(
        kernel, "cuda", torch.bfloat16, hq, hkv, causal, 1e-2, sq=256, sk=256, d=128, layout=layout
    )


# Trimmed blocks (every row sees a key, every key is seen), as the layout hands them out.
BANDS = [(BlockMask(-5, 0), 48, 48), (BlockMask(-3, 10), 40, 48), (BlockMask(None, 4), 48, 44),
         (BlockMask(-7, None), 44, 48), (BlockMask(None, 0), 48, 40)]  # fmt: skip


def _check_band(kernel, device, dtype, mask, sq, sk, tol, d=32):
    """A banded block (a sliding window's piece) against float64 masked attention."""
    gen = torch.Generator().manual_seed(sq * 7 + sk)
    q = torch.randn(2, sq, 4, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, sk, 2, d, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(2, sq, 4, d, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kr, vr = (t.repeat_interleave(2, dim=2) for t in leaves[1:])
    scores = torch.einsum("bqhd,bkhd->bhqk", leaves[0], kr) * 0.3
    scores = scores.masked_fill(~mask.visible(sq, sk), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vr)
    ref.backward(dout)
    to = dict(device=device, dtype=dtype)
    qd, kd, vd, doutd = (t.to(**to) for t in (q, k, v, dout))
    out, lse = kernel.forward(qd, kd, vd, mask, 0.3)
    dq, dk, dv = kernel.backward(doutd, qd, kd, vd, out, lse, mask, 0.3)
    errors = {"out": rel_error(out, ref), "lse": rel_error(lse, scores.logsumexp(-1)),
              "dq": rel_error(dq, leaves[0].grad), "dk": rel_error(dk, leaves[1].grad),
              "dv": rel_error(dv, leaves[2].grad)}  # fmt: skip
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("mask,sq,sk", BANDS)
def test_reference_kernel_bands(mask, sq, sk):
    _check_band(get_kernel("reference", "cpu", torch.float32), "cpu", torch.float32, mask,
                sq, sk, 1e-5)  # fmt: skip


def test_windows_need_a_kernel_that_takes_them():
    assert get_kernel("auto", "cpu", torch.float32, windows=True).name == "reference"
    assert BlockMask(-5, 0).flash_window(48, 48) == (5, 0)
    assert BlockMask(-3, 10).flash_window(40, 48) == (11, 2)
    assert BlockMask(None, 0).flash_window(48, 40) == (-1, 8)
    with pytest.raises(ValueError, match="rows that see no key"):
        BlockMask(-3, 2).flash_window(40, 48)


@pytest.mark.gpu
@pytest.mark.parametrize("mask,sq,sk", BANDS)
@pytest.mark.parametrize("backend", ["cudnn", "torch_flash", "torch_window", "flash_attn"])
def test_gpu_kernel_bands_bf16(backend, mask, sq, sk):
    if backend not in available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} is not available on this machine")
    kernel = get_kernel(backend, "cuda", torch.bfloat16, windows=True)
    _check_band(kernel, "cuda", torch.bfloat16, mask, sq, sk, 1e-2, d=64)


@pytest.mark.gpu
def test_gpu_windows_and_documents_pick_cudnn_frontend_else_pytorch_ops():
    """Windows and documents go to the cuDNN frontend's kernel where it is installed, else
    to the tiled cuDNN window kernel and PyTorch's varlen flash op; dense calls stay on
    PyTorch's cuDNN op."""
    frontend = "cudnn" in available_backends("cuda", torch.bfloat16)
    windows = "cudnn" if frontend else "torch_window"
    documents = "cudnn" if frontend else "torch_flash"
    assert get_kernel("torch", "cuda", torch.bfloat16, windows=True).name == windows
    assert get_kernel("auto", "cuda", torch.bfloat16, windows=True).name == windows
    assert get_kernel("torch", "cuda", torch.bfloat16, documents=True).name == documents
    assert get_kernel("auto", "cuda", torch.bfloat16).name == "torch_cudnn"
    with pytest.raises(ValueError, match="no sliding-window kernel"):
        get_kernel("torch_cudnn", "cuda", torch.bfloat16, windows=True)
