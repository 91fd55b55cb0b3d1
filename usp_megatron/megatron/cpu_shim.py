"""Run megatron-core's GPTModel, DDP, optimizer and schedules on CPU processes (gloo).

Megatron-core hard-codes CUDA in a handful of places (``torch.cuda.current_device()`` as a
device, ``.cuda()``, pinned host buffers, the CUDA RNG tracker, ``Tensor.type()`` compared
with ``'torch.cuda.FloatTensor'``, CUDA streams for overlapped communication). This shim
points each of them at the CPU so a parallel configuration can be checked on a laptop
before spending GPU hours. It changes nothing when CUDA is available unless forced.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

_INSTALLED = False


class _NoStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _NoEvent:
        return _NoEvent()


class _NoEvent:
    """Stands in for ``torch.cuda.Event``; times come from the wall clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._time = 0.0

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _NoEvent) -> float:
        return (end._time - self._time) * 1e3


def _cpu(*args: Any, **kwargs: Any) -> torch.device:
    return torch.device("cpu")


def _tensor_cuda(
    self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any
) -> torch.Tensor:
    return self


def _on_cpu(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(factory: Any) -> Any:
    """Wrap a tensor factory so ``device='cuda'`` means the CPU and ``pin_memory`` is dropped."""

    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    make.__wrapped__ = factory  # type: ignore[attr-defined]
    return make


_FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint")


def _patch_tensor_type() -> None:
    """``Tensor.type()`` of a CPU tensor answers with the CUDA name megatron compares against."""
    original = torch.Tensor.type

    def type_(
        self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
    ) -> Any:
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_  # type: ignore[method-assign]


class _SameGenerator(logging.Filter):
    """On CPU the "GPU" RNG state is the CPU one, so the tracker's warning that the CPU state
    changed inside a fork (it does whenever dropout draws) says nothing: drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_rng() -> None:
    """Megatron's RNG tracker keeps per-parallel-rank CUDA states: keep them on the CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    logging.getLogger(mrandom.__name__).addFilter(_SameGenerator())


def install_cpu_shim(force: bool = False) -> bool:
    """Redirect megatron-core's CUDA calls to the CPU; returns whether it was installed.

    Does nothing when CUDA is available (unless ``force``): on GPUs nothing needs changing.
    Idempotent; call it before building the model.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    cuda = torch.cuda
    cuda.current_device = _cpu  # used as ``device=torch.cuda.current_device()``
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NoStream
    cuda.Event = _NoEvent
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: that one must not recurse.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.empty_cache = lambda: None
    torch.Tensor.cuda = _tensor_cuda  # type: ignore[method-assign]
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
    for name in _FACTORIES:
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    _patch_tensor_type()
    _patch_megatron_rng()
    _INSTALLED = True
    return True
