"""Local attention kernels: ``forward -> (out, lse)`` and a backward that takes both.

``get_kernel(backend, device, dtype)`` resolves a backend name to a kernel; ``auto``
picks the fastest present: FlashAttention, then PyTorch's ops (cuDNN first) on CUDA,
the plain-torch reference elsewhere.
"""

from __future__ import annotations

import torch

from usp_megatron.kernels.base import AttentionKernel
from usp_megatron.kernels.flash_attn import FlashAttnKernel
from usp_megatron.kernels.reference import ReferenceKernel
from usp_megatron.kernels.torch_sdpa import (
    CudnnSDPAKernel,
    EfficientSDPAKernel,
    FlashSDPAKernel,
    TorchSDPAKernel,
)

_KERNELS: dict[str, AttentionKernel] = {
    k.name: k
    for k in (
        FlashAttnKernel(),
        TorchSDPAKernel(),
        CudnnSDPAKernel(),
        FlashSDPAKernel(),
        EfficientSDPAKernel(),
        ReferenceKernel(),
    )
}
BACKENDS = ("auto", *_KERNELS)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def get_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> AttentionKernel:
    """The kernel for ``backend`` on this device and dtype; ValueError if it cannot run there."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        for name in ("flash_attn", "torch", "reference"):
            if _KERNELS[name].available(device, dtype):
                return _KERNELS[name]
    kernel = _KERNELS[backend]
    if not kernel.available(device, dtype):
        raise ValueError(
            f"attention backend {backend!r} cannot run on device {device} with dtype {dtype}; "
            f"available there: {available_backends(device, dtype)}"
        )
    return kernel


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    device = torch.device(device)
    return [name for name, k in _KERNELS.items() if k.available(device, dtype)]


__all__ = ["AttentionKernel", "BACKENDS", "available_backends", "check_backend", "get_kernel"]
