"""Local attention kernels: ``forward -> (out, lse)`` and a backward that takes both.

``get_kernel(backend, device, dtype)`` resolves a backend name to one concrete kernel, once
per device and dtype (never per block):

- ``torch``: the fastest of PyTorch's own ops present: cuDNN, then flash, then efficient.
  Sliding windows: ``torch_window`` (kernels/windowed.py: tiles as long as the window,
  causal squares on cuDNN and the band's anti-causal edge on cuDNN too, reversed), else
  flash. Packed documents: flash (cuDNN's and
  efficient's ops here take neither). ``torch_flash`` is flash alone, windows included.
- ``auto``: ``torch`` on CUDA, the plain-torch reference elsewhere. FlashAttention
  (``flash_attn``) is taken only when asked for by name: it passes the GPU tests (one
  H100), but needs an extra package, and on H100/H200 cuDNN measured faster.
"""

from __future__ import annotations

import warnings

import torch

from usp_megatron.kernels.base import AttentionKernel, accum_dtype
from usp_megatron.kernels.flash_attn import FlashAttnKernel, flash_attn_importable
from usp_megatron.kernels.reference import ReferenceKernel
from usp_megatron.kernels.torch_sdpa import CudnnSDPAKernel, EfficientSDPAKernel, FlashSDPAKernel
from usp_megatron.kernels.windowed import TiledWindowKernel

_KERNELS: dict[str, AttentionKernel] = {
    k.name: k
    for k in (
        FlashAttnKernel(),
        CudnnSDPAKernel(),
        # Tiles of the whole band, the anti-causal edge reversed onto cuDNN too: the fastest
        # variant on one H100 (docs/benchmarks.md, "Sliding windows on cuDNN").
        TiledWindowKernel(CudnnSDPAKernel(), FlashSDPAKernel(), divisor=1, flip_triangles=True),
        FlashSDPAKernel(),
        EfficientSDPAKernel(),
        ReferenceKernel(),
    )
}
#: What each family name tries, in order of measured speed (the first that takes the
#: block's kind of mask wins: torch_cudnn takes no window, torch_window no documents).
_FAMILIES = {
    "auto": ("torch_cudnn", "torch_window", "torch_flash", "torch_efficient", "reference"),
    "torch": ("torch_cudnn", "torch_window", "torch_flash", "torch_efficient"),
}
BACKENDS = ("auto", "flash_attn", "torch", *(name for name in _KERNELS if name != "flash_attn"))
_flash_attn_note_given = False


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

    ``windows``: it must compute banded blocks (sliding windows); among PyTorch's ops only
    flash does, alone or under cuDNN in ``torch_window``. ``documents``: it must compute
    packed documents (varlen); among PyTorch's ops only flash does (the reference kernel
    on CPU).
    """
    check_backend(backend)
    device = torch.device(device)
    for name in _FAMILIES.get(backend, (backend,)):
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
        if any(_KERNELS[k].available(device, dtype) for k in _FAMILIES.get(name, (name,)))
    ]


__all__ = [
    "AttentionKernel",
    "BACKENDS",
    "accum_dtype",
    "available_backends",
    "check_backend",
    "get_kernel",
]
