"""A test-only transport that lets several processes share one GPU: torch.distributed's
point-to-point and all-to-all calls with every tensor staged through host memory, over
gloo.

Why: NCCL refuses two ranks on one device, and gloo's ``send``/``recv`` (what
``batch_isend_irecv`` runs, and what the package's all-to-all and ring use on gloo) hand
the tensor's data pointer straight to gloo's TCP transport, which cannot read device
memory (ProcessGroupGloo.cpp: ``createUnboundBuffer(tensor.data_ptr(), ...)``, no device
check; only some collectives, e.g. ``all_to_all_single``, stage CUDA tensors themselves).

:func:`staged_through_host` replaces ``batch_isend_irecv``, ``all_to_all_single``,
``all_to_all`` and ``all_gather`` in ``torch.distributed`` (the package calls them as
``dist.<name>`` at call time) with versions that send a host copy of every input and
receive into host buffers, copied into the caller's tensors when the work is waited for.
Every tensor is staged, CPU ones too (a fresh host copy), so the same code runs on CPU in
CI, where only the device-to-host copies themselves are left untested.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

_NAMES = ("batch_isend_irecv", "all_to_all_single", "all_to_all", "all_gather")


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy of ``x`` (made after the current stream produced it)."""
    return x.detach().to("cpu", copy=True).contiguous()


def _host_buffer(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype)


class StagedWork:
    """Works in flight on host buffers; ``wait()`` waits for them, then copies each host
    buffer into the tensor the caller asked to receive into."""

    def __init__(self, works: list, receive: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._works, self._receive = works, receive

    def wait(self) -> bool:
        for work in self._works:
            work.wait()
        for target, host in self._receive:
            target.copy_(host)
        self._works, self._receive = [], []
        return True


def _finish(works: list, receive: list, async_op: bool) -> StagedWork | None:
    work = StagedWork(works, receive)
    if async_op:
        return work
    work.wait()
    return None


def _staged(originals: dict) -> dict:
    """The staged versions of ``_NAMES``, calling ``originals`` underneath."""

    def batch_isend_irecv(p2p_op_list: list) -> list:
        ops, receive = [], []
        for op in p2p_op_list:
            if op.op is dist.irecv:
                host = _host_buffer(op.tensor)
                receive.append((op.tensor, host))
            else:
                host = _to_host(op.tensor)
            ops.append(dist.P2POp(op.op, host, op.peer, op.group, op.tag))
        return [StagedWork(originals["batch_isend_irecv"](ops), receive)]

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):  # fmt: skip
        host = _host_buffer(output)
        work = originals["all_to_all_single"](
            host, _to_host(input), output_split_sizes, input_split_sizes, group, True
        )
        return _finish([work], [(output, host)], async_op)

    def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
        hosts = [_host_buffer(x) for x in output_tensor_list]
        inputs = [_to_host(x) for x in input_tensor_list]
        work = originals["all_to_all"](hosts, inputs, group, True)
        return _finish([work], list(zip(output_tensor_list, hosts)), async_op)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        hosts = [_host_buffer(x) for x in tensor_list]
        work = originals["all_gather"](hosts, _to_host(tensor), group, True)
        return _finish([work], list(zip(tensor_list, hosts)), async_op)

    return {
        "batch_isend_irecv": batch_isend_irecv,
        "all_to_all_single": all_to_all_single,
        "all_to_all": all_to_all,
        "all_gather": all_gather,
    }


@contextlib.contextmanager
def staged_through_host() -> Iterator[None]:
    """Inside: ``torch.distributed``'s point-to-point and all-to-all calls go through host
    memory (module doc); restored on exit."""
    originals = {name: getattr(dist, name) for name in _NAMES}
    for name, staged in _staged(originals).items():
        setattr(dist, name, staged)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
