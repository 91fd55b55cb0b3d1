"""The methods compared: ours (USP), PyTorch's context parallel, YunChang, one GPU.

Each distributed family is one class with the same two calls: ``skip_reason`` (a
combination known not to run, recorded without trying) and ``open_shard`` (this rank's
shard of a problem in the family's own layout, with the call that attends on it). A
family keeps its own process groups; the sweep knows none of them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from usp_megatron import LongContextAttention, init_usp_groups
from usp_megatron.kernels import available_backends

from .problems import Attend, Problem, Shard, shard_of

# USP backends that are aliases or unfit for long sequences: run only when asked for.
# ``cudnn`` (the cuDNN frontend's kernel) runs dense causal blocks on the same cuDNN
# kernels as ``torch_cudnn`` (benchmarks/bench_cudnn.py measures the two side by side).
NOT_BY_DEFAULT = {"auto", "torch", "reference", "torch_efficient", "cudnn"}
SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
YUNCHANG_IMPL = {"basic": "basic", "zigzag": "zigzag", "stripe": "strip"}
YUNCHANG_WITH_BACKWARD = {"fa", "fa3"}  # its torch_* attention types raise in backward
YUNCHANG_WITHOUT_LSE = {"torch_math", "torch_cudnn"}  # return zeros for the log-sum-exp


@dataclass(frozen=True)
class Method:
    """One way to run the attention: a family, its kernel backend and (U, R, impl)."""

    family: str  # "1gpu", "usp", "torch_cp", "yunchang"
    backend: str  # in the family's own names (ours: torch_cudnn; PyTorch: cudnn; ...)
    ulysses: int = 1
    ring: int = 1
    impl: str = ""

    @property
    def gpus(self) -> int:
        return 1 if self.family == "1gpu" else self.ulysses * self.ring

    @property
    def kernel(self) -> str:
        """The attention kernel underneath, comparable across families."""
        if self.backend in ("fa", "fa3"):
            return "flash_attn"
        if self.family == "usp" and self.backend == "cudnn":
            return "cudnn_frontend"  # ours through the cuDNN frontend, not PyTorch's op
        return self.backend.removeprefix("torch_")

    @property
    def label(self) -> str:
        if self.family in ("usp", "yunchang"):
            return f"{self.family} {self.ulysses}x{self.ring} {self.impl} {self.backend}"
        return f"{self.family} {self.backend}"


def default_usp_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Our backends present here, less the aliases and the slow ones (NOT_BY_DEFAULT)."""
    present = available_backends(device, dtype)
    return [b for b in present if b not in NOT_BY_DEFAULT] or ["reference"]


def sdpa_attend(backend: str) -> Attend:
    """Causal SDPA on [b, h, s, d] with one backend (``default``: PyTorch chooses).

    ``F.scaled_dot_product_attention`` is looked up at each call, so that inside
    ``context_parallel`` the patched (ring) version runs.
    """

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        if backend == "default":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

    return attend


def whole_sequence_shard(problem: Problem, backend: str, grad: bool, device: torch.device) -> Shard:
    """The one-GPU baseline: the whole problem in SDPA's own contiguous [b, h, S, d]."""
    everything = torch.arange(problem.seq_len, device=device)
    return shard_of(problem, everything, True, sdpa_attend(backend), grad)


class Peer:
    """A distributed family: its layout and groups on ``device``, and what it cannot run."""

    family: str

    def __init__(self, device: torch.device):
        self.device = device

    def skip_reason(self, method: Method, mode: str) -> str | None:
        """Why ``method`` cannot run in ``mode``, known without trying (then recorded)."""
        return None

    def open_shard(
        self, problem: Problem, method: Method, grad: bool
    ) -> contextlib.AbstractContextManager[Shard]:
        """This rank's shard of ``problem`` in the family's layout, for the case's duration."""
        raise NotImplementedError


class Usp(Peer):
    """Ours: ``LongContextAttention`` on the positions our layout gives this rank."""

    family = "usp"

    def __init__(self, device: torch.device):
        super().__init__(device)
        self._groups: dict[tuple[int, int], object] = {}

    @contextlib.contextmanager
    def open_shard(self, problem: Problem, method: Method, grad: bool) -> Iterator[Shard]:
        key = (method.ulysses, method.ring)
        if key not in self._groups:
            self._groups[key] = init_usp_groups(*key)
        attn = LongContextAttention(self._groups[key], layout=method.impl, backend=method.backend)
        positions = attn.positions(problem.seq_len).to(self.device)
        yield shard_of(problem, positions, False, functools.partial(attn, causal=True), grad)


class TorchContextParallel(Peer):
    """PyTorch's ``context_parallel`` on a 1-D mesh of all ranks, load balancing on."""

    family = "torch_cp"

    def __init__(self, device: torch.device, rotate_method: str):
        super().__init__(device)
        self.rotate_method = rotate_method
        self._mesh = None

    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        return self._mesh

    @contextlib.contextmanager
    def open_shard(self, problem: Problem, method: Method, grad: bool) -> Iterator[Shard]:
        """The one buffer handed to ``context_parallel`` is the position index itself, so
        whatever split this torch version makes, we read it back instead of assuming it."""
        from torch.distributed.tensor.experimental import _attention as cp_impl
        from torch.distributed.tensor.experimental import context_parallel

        if hasattr(cp_impl, "_cp_options"):
            cp_impl._cp_options.enable_load_balance = True
        if hasattr(cp_impl, "set_rotate_method"):
            cp_impl.set_rotate_method(self.rotate_method)
        s = problem.seq_len
        pos = torch.arange(s, device=self.device).view(1, 1, s, 1)
        with context_parallel(
            self.mesh(), buffers=[pos], buffer_seq_dims=[2], no_restore_buffers={pos}
        ):
            positions = pos.reshape(-1).clone()
            yield shard_of(problem, positions, True, sdpa_attend(method.backend), grad)


class YunChang(Peer):
    """YunChang 0.6.4's ``LongContextAttention`` on its own split of the positions."""

    family = "yunchang"

    def __init__(self, device: torch.device):
        super().__init__(device)
        self._groups: dict[tuple[int, int], tuple] = {}

    def skip_reason(self, method: Method, mode: str) -> str | None:
        if mode == "fwdbwd" and method.backend not in YUNCHANG_WITH_BACKWARD:
            return (
                f"YunChang 0.6.4 has no backward for attn_type {method.backend} "
                "(pytorch_attn_backward raises); its backward needs flash-attn"
            )
        if method.backend in YUNCHANG_WITHOUT_LSE and method.ring > 1:
            return f"YunChang's {method.backend} returns no log-sum-exp: wrong for ring degree > 1"
        return None

    def use_groups(self, u: int, r: int) -> None:
        """YunChang keeps its groups in a global; build them once per (U, R), then swap in."""
        from yunchang import set_seq_parallel_pg
        from yunchang.globals import PROCESS_GROUP

        if (u, r) not in self._groups:
            set_seq_parallel_pg(u, r, dist.get_rank(), dist.get_world_size())
            self._groups[(u, r)] = (PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
        PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = self._groups[(u, r)]

    @contextlib.contextmanager
    def open_shard(self, problem: Problem, method: Method, grad: bool) -> Iterator[Shard]:
        import yunchang
        from yunchang.kernels import AttnType

        s, u, r = problem.seq_len, method.ulysses, method.ring
        self.use_groups(u, r)
        impl = YUNCHANG_IMPL[method.impl]
        attn = yunchang.LongContextAttention(
            ring_impl_type=impl, attn_type=AttnType.from_string(method.backend)
        )
        # YunChang's own split function, applied to the positions themselves.
        held = yunchang.EXTRACT_FUNC_DICT[impl](
            torch.arange(s).view(1, s), dist.get_rank(), dist.get_world_size(), r, u
        )
        attend = functools.partial(attn, causal=True)
        yield shard_of(problem, held.reshape(-1).to(self.device), False, attend, grad)
