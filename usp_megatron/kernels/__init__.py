"""Local attention kernels: ``forward -> (out, lse)`` and a backward that takes both.

``get_kernel(backend, device, dtype, windows, documents)`` resolves a backend name to one
concrete kernel, once per device, dtype and kind of call (never per block). The family
names ``auto`` and ``torch`` try, in order, what :data:`PREFERENCE` lists for the kind of
call, and take the first kernel available there:

- dense (full or causal): PyTorch's cuDNN op, then flash, then efficient;
- sliding windows: ``cudnn`` (kernels/cudnn_frontend.py: cuDNN's band through the cuDNN
  frontend package), then ``torch_window`` (kernels/windowed.py: tiles of the band on
  PyTorch's cuDNN op), then PyTorch's flash op alone;
- packed documents: ``cudnn`` (ragged batches), then PyTorch's varlen flash op.

``auto`` ends with the plain-torch reference (CPU, float32); ``cudnn`` needs
``pip install 'usp_megatron[cudnn]'`` and is skipped where absent. FlashAttention
(``flash_attn``) is taken only when asked for by name: it passes the GPU tests (one
H100), but needs an extra package, and on H100/H200 cuDNN measured faster.
"""

from __future__ import annotations

import warnings

import torch

from usp_megatron.kernels.base import AttentionKernel, accum_dtype
from usp_megatron.kernels.cudnn_frontend import CudnnFrontendKernel
from usp_megatron.kernels.flash_attn import FlashAttnKernel, flash_attn_importable
from usp_megatron.kernels.reference import ReferenceKernel
from usp_megatron.kernels.torch_sdpa import CudnnSDPAKernel, EfficientSDPAKernel, FlashSDPAKernel
from usp_megatron.kernels.windowed import TiledWindowKernel

_KERNELS: dict[str, AttentionKernel] = {
    k.name: k
    for k in (
        FlashAttnKernel(),
        CudnnSDPAKernel(),
        CudnnFrontendKernel(),
        # Tiles of the whole band, the anti-causal edge reversed onto cuDNN too: the fastest
        # variant on one H100 (docs/benchmarks.md, "Sliding windows on cuDNN").
        TiledWindowKernel(CudnnSDPAKernel(), FlashSDPAKernel(), divisor=1, flip_triangles=True),
        FlashSDPAKernel(),
        EfficientSDPAKernel(),
        ReferenceKernel(),
    )
}
#: What each family name tries, per kind of call; the first available wins. The order is
#: measured speed on one H100 (docs/benchmarks.md; for ``cudnn``, a 4096 window at 128K
#: tokens took 0.066 of dense causal, ``torch_window`` 0.101); benchmarks/bench_cudnn.py
#: measures ``cudnn`` against the others, dense calls and packed documents included.
PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {
        "dense": ("torch_cudnn", "torch_flash", "torch_efficient"),
        "windows": ("cudnn", "torch_window", "torch_flash"),
        "documents": ("cudnn", "torch_flash"),
    },
    "auto": {
        "dense": ("torch_cudnn", "torch_flash", "torch_efficient", "reference"),
        "windows": ("cudnn", "torch_window", "torch_flash", "reference"),
        "documents": ("cudnn", "torch_flash", "reference"),
    },
}
BACKENDS = ("auto", "flash_attn", "torch", *(name for name in _KERNELS if name != "flash_attn"))
_flash_attn_note_given = False


def _kind(windows: bool, documents: bool) -> str:
    return "documents" if documents else "windows" if windows else "dense"


def _candidates(backend: str, kind: str) -> tuple[str, ...]:
    """The kernel names ``backend`` tries for ``kind`` of call (itself, unless a family)."""
    return PREFERENCE[backend][kind] if backend in PREFERENCE else (backend,)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _note_flash_attn_not_chosen() -> None:
    global _flash_attn_note_given
    if not _flash_attn_note_given and flash_attn_importable():
        _flash_attn_note_given = True
        warnings.warn(
            "usp_megatron: flash-attn is installed, but backend 'auto' uses PyTorch's own "
            "attention ops (cuDNN first); pass backend='flash_attn' to use it",
            stacklevel=3,
        )


def get_kernel(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    windows: bool = False,
    documents: bool = False,
) -> AttentionKernel:
    """The kernel for ``backend`` on this device and dtype; ValueError if it cannot run there.

    ``windows``: it must compute banded blocks (sliding windows): ``cudnn``, and among
    PyTorch's ops only flash, alone or under cuDNN in ``torch_window``. ``documents``: it
    must compute packed documents (varlen): ``cudnn``, and among PyTorch's ops only flash
    (the reference kernel on CPU).
    """
    check_backend(backend)
    device = torch.device(device)
    for name in _candidates(backend, _kind(windows, documents)):
        kernel = _KERNELS[name]
        if (
            kernel.available(device, dtype)
            and (kernel.takes_windows or not windows)
            and (kernel.takes_documents or not documents)
        ):
            if backend == "auto" and device.type == "cuda":
                _note_flash_attn_not_chosen()
            return kernel
    if windows and backend in _KERNELS and _KERNELS[backend].available(device, dtype):
        raise ValueError(
            f"attention backend {backend!r} has no sliding-window kernel; use 'torch_window' "
            "(or 'torch' / 'auto', which pick it for windowed layers), 'torch_flash' or "
            "'flash_attn'"
        )
    if documents and backend in _KERNELS and _KERNELS[backend].available(device, dtype):
        raise ValueError(
            f"attention backend {backend!r} has no packed-documents (varlen) kernel; use "
            "'torch_flash' (or 'torch' / 'auto', which pick it for packed documents)"
        )
    raise ValueError(
        f"attention backend {backend!r} cannot run on device {device} with dtype {dtype}; "
        f"available there: {available_backends(device, dtype)}"
    )


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backend names (besides ``auto``) that can run on this device and dtype."""
    device = torch.device(device)
    return [
        name
        for name in BACKENDS[1:]
        if any(
            _KERNELS[k].available(device, dtype)
            for kind in ("dense", "windows", "documents")
            for k in _candidates(name, kind)
        )
    ]


__all__ = [
    "AttentionKernel",
    "BACKENDS",
    "PREFERENCE",
    "accum_dtype",
    "available_backends",
    "check_backend",
    "get_kernel",
]
