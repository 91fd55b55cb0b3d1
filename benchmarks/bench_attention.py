#!/usr/bin/env python3
"""USP attention against PyTorch's context parallel and YunChang, on the GPUs of one host.

    torchrun --nproc-per-node N benchmarks/bench_attention.py [--seqlens 32768,65536] [--out DIR]
    python benchmarks/bench_attention.py --replot DIR/bench.json   # tables and plot again

docs/benchmark_method.md says how to run it and what each column means. The design in brief:

- Every rank builds the same full inputs from one seed, so no rank needs another's data.
- Rank 0 runs the whole problem on its one GPU with the best kernel: that time is ``T_1``
  (ideal scaling is ``T_1 / N``) and that output and those gradients are the reference.
  They are broadcast, and each method's error is summed shard by shard (its own global
  positions) and all-reduced: nothing is gathered onto one GPU.
- Every case runs inside a guard: an error (out of memory, a missing package, a combination
  a peer does not support) is recorded with its reason and the sweep goes on. Failures
  must be symmetric across ranks (the same shapes fail everywhere); a rank failing alone
  inside a collective would leave the others waiting until the NCCL timeout.
- A time budget skips the remaining cases (recorded as skipped) so that one device call
  never runs past its limit; the JSON is rewritten after every sequence length.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import usp_megatron  # noqa: E402
from usp_megatron import LongContextAttention, init_usp_groups  # noqa: E402
from usp_megatron.kernels import BACKENDS, available_backends  # noqa: E402
from usp_megatron.layout import RING_IMPLS  # noqa: E402

MODES = ("fwd", "fwdbwd")
BWD_FLOP_FACTOR = 3.5  # forward + backward = 1 + 2.5 forwards (5 matmuls vs 2; no recompute)
GQA_RATIO = 4  # 32 query heads share 8 key/value heads
FLOP_CONVENTION = (
    "causal forward = 4*b*s^2*hq*d / 2 (QK^T and PV, 2 flops per multiply-add, half the "
    "square unmasked); forward+backward = 3.5 x forward; TFLOP/s per GPU = flops / (N * T)"
)
# USP backends that are aliases or unfit for long sequences: run only when asked for.
NOT_BY_DEFAULT = {"auto", "torch", "reference", "torch_efficient"}
YUNCHANG_IMPL = {"basic": "basic", "zigzag": "zigzag", "stripe": "strip"}
YUNCHANG_WITH_BACKWARD = {"fa", "fa3"}  # its torch_* attention types raise in backward
YUNCHANG_WITHOUT_LSE = {"torch_math", "torch_cudnn"}  # return zeros for the log-sum-exp
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


# ---------------------------------------------------------------------------- figures


def attention_flops(batch: int, seq_len: int, heads: int, head_dim: int, mode: str) -> float:
    """FLOPs of causal attention over the whole sequence (FLOP_CONVENTION)."""
    forward = 4 * batch * seq_len**2 * heads * head_dim / 2
    return forward * (BWD_FLOP_FACTOR if mode == "fwdbwd" else 1.0)


def tflops_per_gpu(flops: float, ms: float, gpus: int) -> float:
    return flops / (ms * 1e-3) / gpus / 1e12


def fraction_of_ideal(t1_ms: float, ms: float, gpus: int) -> float:
    """T_1 / (N T): 1.0 is perfect scaling of the one-GPU time."""
    return t1_ms / (gpus * ms)


# ---------------------------------------------------------------------------- cases


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
        return self.backend.removeprefix("torch_")

    @property
    def label(self) -> str:
        if self.family in ("usp", "yunchang"):
            return f"{self.family} {self.ulysses}x{self.ring} {self.impl} {self.backend}"
        return f"{self.family} {self.backend}"


@dataclass
class Problem:
    """The full inputs ``[b, S, h, d]`` (identical on every rank) and rank 0's reference."""

    seq_len: int
    kv_heads: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    ref: dict[str, torch.Tensor]  # out, dq, dk, dv of the one-GPU run


@dataclass
class Shard:
    """One rank's inputs for one case, in the method's layout, and their global positions."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    positions: torch.Tensor  # global sequence positions of the local rows, in local order
    heads_first: bool  # [b, h, s, d] (PyTorch SDPA's layout) rather than [b, s, h, d]
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def bshd(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2) if self.heads_first else x


def shard_of(problem: Problem, positions: torch.Tensor, heads_first: bool,
             attend: Callable, grad: bool) -> Shard:
    """Copy this rank's rows out of the full inputs (untimed) into the method's layout."""

    def local(full: torch.Tensor, leaf: bool) -> torch.Tensor:
        x = full.index_select(1, positions)
        x = x.transpose(1, 2).contiguous() if heads_first else x
        return x.requires_grad_(grad) if leaf else x

    q, k, v = (local(t, True) for t in (problem.q, problem.k, problem.v))
    return Shard(q, k, v, local(problem.dout, False), positions, heads_first, attend)


def make_step(shard: Shard, mode: str) -> Callable[[], torch.Tensor]:
    """One timed iteration: forward under no_grad, or forward and backward."""
    if mode == "fwd":
        def step() -> torch.Tensor:
            with torch.no_grad():
                return shard.attend(shard.q, shard.k, shard.v)
    else:
        def step() -> torch.Tensor:
            for x in (shard.q, shard.k, shard.v):
                x.grad = None
            out = shard.attend(shard.q, shard.k, shard.v)
            out.backward(shard.dout)
            return out.detach()
    return step


def time_steps(step: Callable[[], torch.Tensor], warmup: int, iters: int,
               device: torch.device, sync_ranks: bool) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    if sync_ranks:
        dist.barrier()
    if not cuda:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def sharded_rel_error(
    local: torch.Tensor, ref_full: torch.Tensor, positions: torch.Tensor
) -> float:
    """||x - ref|| / ||ref|| over the whole sequence, each rank adding its own rows."""
    ref = ref_full.index_select(1, positions).float()
    diff = local.float() - ref
    sums = torch.stack([diff.square().sum(), ref.square().sum()]).double()
    dist.all_reduce(sums)
    num, den = sums.tolist()
    return math.sqrt(num / den) if den > 0 else float("inf")


def sdpa_attend(backend: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
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


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------- the run


class Bench:
    """The sweep on this rank: process groups, the cases, and (rank 0) the records."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = args.torch_device
        self.dtype = args.torch_dtype
        self.started = time.monotonic()
        self.records: list[dict] = []  # rank 0 only
        self.t1_ms: dict[tuple[int, int, str], float] = {}  # rank 0 only
        self.out_dir = Path(args.out)
        self._usp_groups: dict[tuple[int, int], object] = {}
        self._yunchang_groups: dict[tuple[int, int], tuple] = {}
        self._mesh = None
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "bench.log").write_text("")

    # -- plumbing

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)
            with open(self.out_dir / "bench.log", "a") as f:
                f.write(msg + "\n")

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def guarded(self, fn: Callable[[], object]) -> tuple[object, str | None]:
        """Run ``fn`` on every rank; the first rank's error (if any) is everyone's verdict."""
        try:
            value, reason = fn(), None
        except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
            value, reason = None, _reason(exc)
        if reason is not None:
            self.free()
        reasons: list[str | None] = [None] * self.world
        dist.all_gather_object(reasons, reason)
        bad = [f"rank {r}: {text}" for r, text in enumerate(reasons) if text]
        return value, (bad[0] if bad else None)

    def budget_spent(self) -> str | None:
        """Why nothing more may start, if so; rank 0's clock decides for everyone."""
        late = time.monotonic() - self.started > self.args.budget_s
        flag = torch.tensor([int(late)], device=self.device)
        dist.broadcast(flag, 0)
        return f"time budget of {self.args.budget_s:g} s spent" if flag.item() else None

    def usp_groups(self, u: int, r: int):
        if (u, r) not in self._usp_groups:
            self._usp_groups[(u, r)] = init_usp_groups(u, r)
        return self._usp_groups[(u, r)]

    def use_yunchang_groups(self, u: int, r: int) -> None:
        """YunChang keeps its groups in a global; build them once per (U, R), then swap in."""
        from yunchang import set_seq_parallel_pg
        from yunchang.globals import PROCESS_GROUP

        if (u, r) not in self._yunchang_groups:
            set_seq_parallel_pg(u, r, self.rank, self.world)
            self._yunchang_groups[(u, r)] = (PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
        PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = self._yunchang_groups[(u, r)]

    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world,))
        return self._mesh

    # -- the methods, each yielding this rank's shard

    @contextlib.contextmanager
    def open_shard(self, problem: Problem, method: Method, grad: bool) -> Iterator[Shard]:
        s, u, r = problem.seq_len, method.ulysses, method.ring
        if method.family == "usp":
            groups = self.usp_groups(u, r)
            attn = LongContextAttention(groups, ring_impl=method.impl, backend=method.backend)
            positions = attn.positions(s)
            attend = functools.partial(attn, causal=True)
            yield shard_of(problem, positions.to(self.device), False, attend, grad)
        elif method.family == "yunchang":
            import yunchang
            from yunchang.kernels import AttnType

            self.use_yunchang_groups(u, r)
            impl = YUNCHANG_IMPL[method.impl]
            attn = yunchang.LongContextAttention(
                ring_impl_type=impl, attn_type=AttnType.from_string(method.backend)
            )
            # YunChang's own split function, applied to the positions themselves.
            held = yunchang.EXTRACT_FUNC_DICT[impl](
                torch.arange(s).view(1, s), self.rank, self.world, r, u
            )
            attend = functools.partial(attn, causal=True)
            yield shard_of(problem, held.reshape(-1).to(self.device), False, attend, grad)
        elif method.family == "torch_cp":
            with self.torch_context_parallel(s) as positions:
                yield shard_of(problem, positions, True, sdpa_attend(method.backend), grad)
        else:
            raise ValueError(f"unknown method family {method.family!r}")

    @contextlib.contextmanager
    def torch_context_parallel(self, seq_len: int) -> Iterator[torch.Tensor]:
        """PyTorch's context parallel (head-tail load balancing on); yields our positions.

        The one buffer handed to ``context_parallel`` is the position index itself, so
        whatever split this torch version makes, we read it back instead of assuming it.
        """
        from torch.distributed.tensor.experimental import _attention as cp_impl
        from torch.distributed.tensor.experimental import context_parallel

        if hasattr(cp_impl, "_cp_options"):
            cp_impl._cp_options.enable_load_balance = True
        if hasattr(cp_impl, "set_rotate_method"):
            cp_impl.set_rotate_method(self.args.torch_cp_rotate)
        pos = torch.arange(seq_len, device=self.device).view(1, 1, seq_len, 1)
        with context_parallel(self.mesh(), buffers=[pos], buffer_seq_dims=[2],
                              no_restore_buffers={pos}):
            yield pos.reshape(-1).clone()

    # -- one case

    def record(self, problem: Problem, method: Method, mode: str, **fields) -> None:
        """Rank 0 keeps and prints the case's figures; the other ranks only took part."""
        if self.rank != 0:
            return
        rec = dict(family=method.family, label=method.label, backend=method.backend,
                   kernel=method.kernel, ulysses=method.ulysses, ring=method.ring,
                   impl=method.impl, gpus=method.gpus, mode=mode, seq_len=problem.seq_len,
                   heads=self.args.heads, kv_heads=problem.kv_heads, head_dim=self.args.head_dim,
                   batch=self.args.batch, dtype=self.args.dtype, status="ok", reason=None)
        rec.update(fields)
        if rec["status"] == "ok":
            flops = attention_flops(self.args.batch, problem.seq_len, self.args.heads,
                                    self.args.head_dim, mode)
            rec["tflops_per_gpu"] = tflops_per_gpu(flops, rec["ms"], method.gpus)
            t1 = self.t1_ms.get((problem.seq_len, problem.kv_heads, mode))
            rec["t1_ms"] = t1
            rec["fraction_of_ideal"] = fraction_of_ideal(t1, rec["ms"], method.gpus) if t1 else None
        self.records.append(rec)
        self.log(format_case(rec, time.monotonic() - self.started))

    def static_skip(self, method: Method, mode: str) -> str | None:
        """Combinations known not to run, recorded without trying."""
        if method.family == "yunchang":
            if mode == "fwdbwd" and method.backend not in YUNCHANG_WITH_BACKWARD:
                return (f"YunChang 0.6.4 has no backward for attn_type {method.backend} "
                        "(pytorch_attn_backward raises); its backward needs flash-attn")
            if method.backend in YUNCHANG_WITHOUT_LSE and method.ring > 1:
                return (f"YunChang's {method.backend} returns no log-sum-exp: wrong for "
                        "ring degree > 1")
        return None

    def measure(self, problem: Problem, method: Method, mode: str) -> dict:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with self.open_shard(problem, method, mode == "fwdbwd") as shard:
            step = make_step(shard, mode)
            times = time_steps(step, self.args.warmup, self.args.iters, self.device, True)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
            out = step()
            results = {"out": out}
            if mode == "fwdbwd":
                results.update(dq=shard.q.grad, dk=shard.k.grad, dv=shard.v.grad)
            errors = {
                f"err_{name}": sharded_rel_error(shard.bshd(x), problem.ref[name], shard.positions)
                for name, x in results.items()
            }
        each: list = [None] * self.world
        dist.all_gather_object(each, (statistics.median(times), peak))
        peaks = [p for _, p in each if p is not None]
        return dict(ms=max(m for m, _ in each), ms_per_rank=[m for m, _ in each],
                    times_ms_rank0=times, peak_gib=max(peaks) if peaks else None, **errors)

    def run_case(self, problem: Problem, method: Method, mode: str) -> None:
        skip = self.static_skip(method, mode) or self.budget_spent()
        if skip is not None:
            self.record(problem, method, mode, status="skipped", reason=skip)
            return
        measure = self.time_single_gpu if method.family == "1gpu" else self.measure
        metrics, reason = self.guarded(functools.partial(measure, problem, method, mode))
        if reason is not None:
            self.record(problem, method, mode, status="failed", reason=reason)
            return
        if method.family == "1gpu" and self.rank == 0:
            self.t1_ms[(problem.seq_len, problem.kv_heads, mode)] = metrics["ms"]
        self.record(problem, method, mode, **(metrics or {}))

    # -- the one-GPU problem on rank 0

    def single_gpu_shard(self, problem: Problem, grad: bool, backend: str) -> Shard:
        """The whole problem in SDPA's own contiguous [b, h, S, d] layout."""
        everything = torch.arange(problem.seq_len, device=self.device)
        return shard_of(problem, everything, True, sdpa_attend(backend), grad)

    def reference_on_rank0(self, problem: Problem, grads: bool) -> str:
        """Rank 0: out (and grads) with the first reference backend that runs; returns its name."""
        failures = []
        for backend in self.args.ref_backends:
            try:
                shard = self.single_gpu_shard(problem, grads, backend)
                out = make_step(shard, "fwdbwd" if grads else "fwd")()
            except Exception as exc:  # noqa: BLE001 - try the next backend
                failures.append(f"{backend}: {_reason(exc)}")
                self.free()
                continue
            problem.ref["out"] = shard.bshd(out).contiguous()
            if grads:
                for name, x in (("dq", shard.q), ("dk", shard.k), ("dv", shard.v)):
                    problem.ref[name] = shard.bshd(x.grad).contiguous()
            return backend
        raise RuntimeError("no reference backend ran: " + "; ".join(failures))

    def broadcast_reference(self, problem: Problem, grads: bool) -> None:
        shapes = {"out": problem.q.shape}
        if grads:
            shapes.update(dq=problem.q.shape, dk=problem.k.shape, dv=problem.v.shape)
        for name, shape in shapes.items():
            if self.rank != 0:
                problem.ref[name] = torch.empty(shape, dtype=self.dtype, device=self.device)
            dist.broadcast(problem.ref[name], 0)

    def time_single_gpu(self, problem: Problem, method: Method, mode: str) -> dict | None:
        """``T_1`` on rank 0; the other ranks wait."""
        if self.rank != 0:
            return None
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        shard = self.single_gpu_shard(problem, mode == "fwdbwd", method.backend)
        times = time_steps(make_step(shard, mode), self.args.warmup, self.args.iters,
                           self.device, False)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
        ms = statistics.median(times)
        return dict(ms=ms, ms_per_rank=[ms], times_ms_rank0=times, peak_gib=peak)

    # -- the sweep

    def make_problem(self, seq_len: int, kv_heads: int) -> Problem:
        a = self.args
        gen = torch.Generator(device=self.device).manual_seed(a.seed + seq_len + kv_heads)

        def randn(heads: int) -> torch.Tensor:
            shape = (a.batch, seq_len, heads, a.head_dim)
            return torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)

        return Problem(seq_len, kv_heads, randn(a.heads), randn(kv_heads), randn(kv_heads),
                       randn(a.heads), {})

    def run_problem(self, seq_len: int, kv_heads: int, methods: list[Method]) -> None:
        """Inputs and reference for one shape, then every mode and case on them."""
        a = self.args
        grads = "fwdbwd" in a.modes
        stub = Problem(seq_len, kv_heads, *([None] * 4), {})
        planned = [Method("1gpu", a.ref_backends[0]), *methods]
        every = [(m, mode) for mode in a.modes for m in planned]
        spent = self.budget_spent()
        if spent is not None:
            for method, mode in every:
                self.record(stub, method, mode, status="skipped", reason=spent)
            return
        problem, reason = self.guarded(lambda: self.make_problem(seq_len, kv_heads))
        if reason is None:
            backend, reason = self.guarded(
                lambda: self.reference_on_rank0(problem, grads) if self.rank == 0 else None
            )
        if reason is None:
            _, reason = self.guarded(functools.partial(self.broadcast_reference, problem, grads))
        if reason is not None:
            for method, mode in every:
                self.record(stub, method, mode, status="failed", reason=f"reference: {reason}")
            return
        chosen = [backend]  # rank 0 knows which reference backend ran
        dist.broadcast_object_list(chosen, 0)
        for mode in a.modes:
            for method in [Method("1gpu", chosen[0]), *methods]:
                self.run_case(problem, method, mode)

    def run(self, methods: list[Method]) -> None:
        for kv_heads in self.args.kv_heads:
            for seq_len in self.args.seqlens:
                self.run_problem(seq_len, kv_heads, methods)
                self.free()  # the shape's inputs and reference went with run_problem
                if self.rank == 0:
                    add_speedups(self.records)
                    self.write_json()

    def write_json(self) -> None:
        data = {"meta": self.meta(), "records": self.records}
        (self.out_dir / "bench.json").write_text(json.dumps(data, indent=1, default=str))

    def meta(self) -> dict:
        a = self.args
        meta = dict(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            world_size=self.world, device=str(self.device), dtype=a.dtype,
            torch=torch.__version__, python=platform.python_version(),
            usp_megatron=getattr(usp_megatron, "__version__", None), argv=sys.argv[1:],
            flop_convention=FLOP_CONVENTION,
            ideal="T_1 / N, T_1 = one GPU running the whole problem with the reference backend",
            error="||x - x_1gpu|| / ||x_1gpu|| over the whole tensor, float32",
            peak_gib="max over ranks of max_memory_allocated during the case minus the "
                     "memory allocated before it (inputs shards included)",
            ms="median of the timed iterations on each rank, max over ranks",
            settings={k: v for k, v in vars(a).items() if not k.startswith("torch_")},
        )
        if self.device.type == "cuda":
            meta.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(),
                        nccl=str(torch.cuda.nccl.version()))
        try:
            import yunchang

            meta["yunchang"] = yunchang.__version__
        except ImportError as exc:
            meta["yunchang"] = f"not importable: {exc}"
        return meta

    def finish(self) -> None:
        if self.rank != 0:
            return
        self.write_json()
        png = plot_fractions(self.records, self.out_dir / "bench.png", self.meta())
        self.log(f"wrote {self.out_dir / 'bench.json'}, {png}, {self.out_dir / 'bench.log'}")
        self.log(format_failures(self.records))
        self.log(format_summary(self.records, self.meta()))


# ---------------------------------------------------------------------------- reporting


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_<peer>: the peer's best time at the same shape and mode over this time;
    for our rows also speedup_vs_yunchang_same_ur_kernel: YunChang's best at the same
    U x R with the same kernel (the like-for-like forward comparison)."""
    best: dict[tuple, float] = {}
    for r in records:
        if r["status"] == "ok" and r["family"] in ("torch_cp", "yunchang"):
            shape = (r["seq_len"], r["kv_heads"], r["mode"])
            for key in ((r["family"], *shape), (r["family"], *shape, r["ulysses"], r["ring"],
                                                r["kernel"])):
                best[key] = min(best.get(key, math.inf), r["ms"])
    for r in records:
        shape = (r["seq_len"], r["kv_heads"], r["mode"])
        for name, key in (
            ("torch_cp", ("torch_cp", *shape)),
            ("yunchang", ("yunchang", *shape)),
            ("yunchang_same_ur_kernel", ("yunchang", *shape, r["ulysses"], r["ring"], r["kernel"])),
        ):
            peer_ms = best.get(key)
            ok = (r["status"] == "ok" and peer_ms is not None
                  and r["family"] not in (key[0], "1gpu"))
            r[f"speedup_vs_{name}"] = peer_ms / r["ms"] if ok else None


def _num(x: float | None, fmt: str) -> str:
    """``format(x, fmt)``, or a dash as wide when there is no figure."""
    width = fmt.split(".")[0]
    return format("-", f">{width}") if x is None else format(x, fmt)


def _grad_err(r: dict) -> float | None:
    errs = [r.get(f"err_{n}") for n in ("dq", "dk", "dv")]
    return max(errs) if all(e is not None for e in errs) else None


def format_case(r: dict, elapsed: float) -> str:
    head = (f"[{elapsed:6.1f}s] {r['mode']:6} kv{r['kv_heads']:<3} {r['seq_len']:>7} "
            f"{r['label']:<38}")
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()}: {r['reason']}"
    return (f"{head} {r['ms']:9.2f} ms {r['tflops_per_gpu']:6.1f} TF/s "
            f"ideal {_num(r['fraction_of_ideal'], '5.3f')} err {_num(r.get('err_out'), '.1e')}"
            f"/{_num(_grad_err(r), '.1e')} mem {_num(r['peak_gib'], '.2f')} GiB")


def summary_rows(records: list[dict]) -> list[dict]:
    """Per shape and mode: the 1-GPU row, our best per (U x R, backend), each PyTorch CP
    backend, YunChang's best per (U x R, attn type); and one row, saying why, for a family
    none of whose cases ran there (every failure is listed by format_failures)."""
    family_order = {"1gpu": 0, "usp": 1, "torch_cp": 2, "yunchang": 3}
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["mode"], r["kv_heads"], r["seq_len"], family_order[r["family"]],
               r["ulysses"], r["ring"], r["backend"])
        if r["status"] == "ok" and (key not in rows or r["ms"] < rows[key]["ms"]):
            rows[key] = r
    ran = {key[:4] for key in rows}
    for r in records:
        family_key = (r["mode"], r["kv_heads"], r["seq_len"], family_order[r["family"]])
        if family_key not in ran:
            rows.setdefault((*family_key, 0, 0, ""), r)
    mode_order = {m: i for i, m in enumerate(MODES)}
    return [rows[k] for k in sorted(rows, key=lambda k: (mode_order[k[0]], -k[1], *k[2:]))]


def format_summary(records: list[dict], meta: dict) -> str:
    gpu = meta.get("gpu", meta["device"])
    shape = f"heads {records[0]['heads']} dim {records[0]['head_dim']}" if records else ""
    lines = [
        f"SUMMARY  {gpu} x{meta['world_size']}  torch {meta['torch']}  {meta['dtype']}  "
        f"{shape}  yunchang {meta['yunchang']}",
        "ideal = T_1/(N*T), T_1 = the 1gpu row; TF/s per GPU with fwd+bwd = 3.5 x fwd; "
        "vs_* = peer's best ms / ms; err = rel. error of out / max over dq,dk,dv",
        f"{'mode':6} {'kv':>3} {'seq':>7} {'method':<38} {'ms':>9} {'TF/s':>6} {'ideal':>6} "
        f"{'vs_tcp':>6} {'vs_yc':>6} {'err_out':>8} {'err_grad':>8} {'GiB':>6}",
    ]
    for r in summary_rows(records):
        if r["status"] != "ok":
            lines.append(f"{r['mode']:6} {r['kv_heads']:>3} {r['seq_len']:>7} "
                         f"{r['family'] + ': no case ran':<38} {r['status']}: {r['reason'][:70]}")
            continue
        head = f"{r['mode']:6} {r['kv_heads']:>3} {r['seq_len']:>7} {r['label']:<38}"
        cells = [
            format(r["ms"], "9.2f"), format(r["tflops_per_gpu"], "6.1f"),
            _num(r["fraction_of_ideal"], "6.3f"), _num(r.get("speedup_vs_torch_cp"), "6.2f"),
            _num(r.get("speedup_vs_yunchang"), "6.2f"), _num(r.get("err_out"), "8.1e"),
            _num(_grad_err(r), "8.1e"), _num(r["peak_gib"], "6.2f"),
        ]
        lines.append(f"{head} " + " ".join(cells))
    return "\n".join(lines)


def format_failures(records: list[dict]) -> str:
    """Failed and skipped cases, one line per (family, status, reason) with a count."""
    seen: dict[tuple, int] = {}
    for r in records:
        if r["status"] != "ok":
            key = (r["family"], r["status"], r["reason"])
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return "no failed or skipped cases"
    lines = ["not run (count family status: reason):"]
    for (family, status, reason), n in seen.items():
        lines.append(f"  {n:3d} {family} {status}: {reason[:150]}")
    return "\n".join(lines)


def plot_fractions(records: list[dict], path: Path, meta: dict) -> str:
    """Fraction of ideal against sequence length: our best config and each peer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"(no plot: {exc})"
    ok = [r for r in records if r["status"] == "ok" and r.get("fraction_of_ideal") is not None
          and r["family"] != "1gpu"]
    if not ok:
        return "(no plot: no case with a fraction of ideal)"
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    kvs = sorted({r["kv_heads"] for r in ok}, reverse=True)  # MHA first
    fig, axes = plt.subplots(len(kvs), len(modes), figsize=(6.5 * len(modes), 4.5 * len(kvs)),
                             squeeze=False)
    for (row, kv), (col, mode) in itertools.product(enumerate(kvs), enumerate(modes)):
        ax = axes[row][col]
        series: dict[str, dict[int, dict]] = {}
        for r in ok:
            if (r["mode"], r["kv_heads"]) != (mode, kv):
                continue
            name = {"usp": f"USP best ({r['kernel']})", "torch_cp": f"PyTorch CP ({r['kernel']})",
                    "yunchang": f"YunChang best ({r['kernel']})"}[r["family"]]
            points = series.setdefault(name, {})
            best = points.get(r["seq_len"])
            if best is None or r["fraction_of_ideal"] > best["fraction_of_ideal"]:
                points[r["seq_len"]] = r
        for name, points in sorted(series.items()):
            seqs = sorted(points)
            fracs = [points[s]["fraction_of_ideal"] for s in seqs]
            ax.plot(seqs, fracs, marker="o", label=name)
            if name.startswith("USP"):
                for s in seqs:
                    r = points[s]
                    ax.annotate(f"{r['ulysses']}x{r['ring']} {r['impl']}",
                                (s, r["fraction_of_ideal"]), fontsize=7,
                                textcoords="offset points", xytext=(0, 6), ha="center")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        seqs = sorted({r["seq_len"] for r in ok})
        ax.set_xticks(seqs, [f"{s // 1024}K" if s >= 1024 else str(s) for s in seqs])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("total sequence length")
        ax.set_ylabel("fraction of ideal  T1 / (N T)")
        ax.set_title(f"{mode}, {ok[0]['heads']} q / {kv} kv heads")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta.get('gpu', meta['device'])} x{meta['world_size']}, torch {meta['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------- arguments


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_configs(text: str | None, world: int) -> list[tuple[int, int]]:
    """``"2x2,4x1"`` -> [(2, 2), (4, 1)] (U x R); default: every factorisation of ``world``."""
    if text is None:
        return [(u, world // u) for u in range(1, world + 1) if world % u == 0]
    configs = []
    for item in _csv(text):
        try:
            u, r = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--configs entry {item!r} is not UxR, e.g. 2x2") from None
        if u * r != world:
            raise ValueError(f"--configs entry {item!r}: {u} * {r} != world size {world}")
        configs.append((u, r))
    return configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seqlens", default="32768,65536,131072", help="total sequence lengths")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--configs", default=None, help="UxR list (default: every factorisation of N)")
    p.add_argument("--impls", default=",".join(RING_IMPLS), help="ring impls (ours and YunChang)")
    p.add_argument("--backends", default=None,
                   help="our kernel backends, or 'none' (default: those present here, less "
                        + ", ".join(sorted(NOT_BY_DEFAULT)) + ")")
    p.add_argument("--peers", default="torch_cp,yunchang", help="torch_cp, yunchang, or 'none'")
    p.add_argument("--torch-cp-backends", default=None,
                   help="SDPA backends for PyTorch CP (default cudnn,flash; CPU: default)")
    p.add_argument("--torch-cp-rotate", default="allgather", choices=("allgather", "alltoall"))
    p.add_argument("--yunchang-attn", default=None,
                   help="YunChang attn_type values (default torch_flash; CPU: torch_math)")
    p.add_argument("--ref-backends", default=None,
                   help="one-GPU SDPA backends, the first that runs wins "
                        "(default cudnn,flash; CPU: default)")
    p.add_argument("--gqa", default="off", choices=("off", "on", "both"),
                   help=f"on: kv heads = heads/{GQA_RATIO}; both: MHA and GQA")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 (CPU: float32)")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="cuda with NCCL, or cpu with gloo for a smoke run "
                        "(default: cuda if present)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="start no case after this many seconds (the device call limit is 600)")
    p.add_argument("--nccl-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    a = p.parse_args(argv)

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = a.device == "cpu"
    a.dtype = a.dtype or ("float32" if cpu else "bfloat16")
    a.seqlens = [int(x) for x in _csv(a.seqlens)]
    a.modes = _csv(a.modes)
    a.impls = _csv(a.impls)
    a.peers = [] if a.peers == "none" else _csv(a.peers)
    a.torch_cp_backends = _csv(a.torch_cp_backends or ("default" if cpu else "cudnn,flash"))
    a.yunchang_attn = _csv(a.yunchang_attn or ("torch_math" if cpu else "torch_flash"))
    a.ref_backends = _csv(a.ref_backends or ("default" if cpu else "cudnn,flash"))
    a.kv_heads = {"off": [a.heads], "on": [a.heads // GQA_RATIO],
                  "both": [a.heads, a.heads // GQA_RATIO]}[a.gqa]
    a.torch_device = torch.device(a.device)
    a.torch_dtype = getattr(torch, a.dtype)
    if a.backends is None:
        present = available_backends(a.torch_device, a.torch_dtype)
        a.backends = [b for b in present if b not in NOT_BY_DEFAULT] or ["reference"]
    else:
        a.backends = [] if a.backends == "none" else _csv(a.backends)
    sdpa_names = (*SDPA_BACKENDS, "default")
    for name, values, allowed in (("--modes", a.modes, MODES), ("--impls", a.impls, RING_IMPLS),
                                  ("--backends", a.backends, BACKENDS),
                                  ("--peers", a.peers, ("torch_cp", "yunchang")),
                                  ("--torch-cp-backends", a.torch_cp_backends, sdpa_names),
                                  ("--ref-backends", a.ref_backends, sdpa_names)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: {bad} not in {list(allowed)}")
    if a.heads % GQA_RATIO and a.gqa != "off":
        p.error(f"--gqa needs --heads divisible by {GQA_RATIO}, got {a.heads}")
    return a


def plan_methods(args: argparse.Namespace, world: int) -> list[Method]:
    """Every case of the sweep but the one-GPU rows, in the order they run."""
    configs = parse_configs(args.configs, world)
    methods = [Method("usp", b, u, r, impl) for (u, r) in configs for impl in args.impls
               for b in args.backends]
    if "torch_cp" in args.peers:
        methods += [Method("torch_cp", b, 1, world) for b in args.torch_cp_backends]
    if "yunchang" in args.peers:
        methods += [Method("yunchang", b, u, r, impl) for (u, r) in configs for impl in args.impls
                    for b in args.yunchang_attn]
    return methods


def replot(path: Path) -> None:
    """Tables and plot again from a saved bench.json (no GPUs needed), next to it."""
    data = json.loads(path.read_text())
    records, meta = data["records"], data["meta"]
    print(plot_fractions(records, path.with_suffix(".png"), meta))
    print(format_summary(records, meta))


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--replot":
        replot(Path(sys.argv[2]))
        return
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it
    try:
        methods = plan_methods(args, world)  # bad --configs fail here, before any group
    except ValueError as exc:
        sys.exit(f"bench_attention: {exc}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kwargs = {}
    if args.device == "cuda":
        args.torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(args.torch_device)
        kwargs["device_id"] = args.torch_device
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            timeout=timedelta(seconds=args.nccl_timeout_s), **kwargs)
    try:
        bench = Bench(args)
        bench.log(f"{len(methods)} cases x {len(args.modes)} modes x {len(args.seqlens)} lengths x "
                  f"{len(args.kv_heads)} head layouts on {dist.get_world_size()} ranks; "
                  f"FLOPs: {FLOP_CONVENTION}")
        bench.log("settings: " + json.dumps(bench.meta()["settings"]))
        bench.run(methods)
        bench.finish()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
