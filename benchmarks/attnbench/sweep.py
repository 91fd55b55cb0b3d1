"""The benchmark's sweep on this rank: every (shape, mode, method) case, guarded and timed.

- Rank 0 runs the whole problem on its one GPU with the best kernel: that time is ``T_1``
  (ideal scaling is ``T_1 / N``) and that output and those gradients are the reference.
  They are broadcast, and each method's error is summed shard by shard and all-reduced.
- Every case runs inside a guard: an error (out of memory, a missing package, a combination
  a peer does not support) is recorded with its reason and the sweep goes on. Failures
  must be symmetric across ranks (the same shapes fail everywhere); a rank failing alone
  inside a collective would leave the others waiting until the NCCL timeout.
- A time budget skips the remaining cases (recorded as skipped) so that a run ends within
  the time given to it; the JSON is rewritten after every sequence length.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from . import report
from .configs import parse_configs
from .flops import attention_flops, fraction_of_ideal, tflops_per_gpu
from .peers import Method, Peer, TorchContextParallel, Usp, YunChang, whole_sequence_shard
from .problems import Problem, make_problem, make_step, sharded_rel_error
from .timing import PeakMemory, time_steps


def plan_methods(args: argparse.Namespace, world: int) -> list[Method]:
    """Every case of the sweep but the one-GPU rows, in the order they run.

    ValueError on a bad ``--configs``, before any process group exists.
    """
    configs = parse_configs(args.configs, world)
    methods = [
        Method("usp", b, u, r, impl)
        for (u, r) in configs
        for impl in args.impls
        for b in args.backends
    ]
    if "torch_cp" in args.peers:
        methods += [Method("torch_cp", b, 1, world) for b in args.torch_cp_backends]
    if "yunchang" in args.peers:
        methods += [
            Method("yunchang", b, u, r, impl)
            for (u, r) in configs
            for impl in args.impls
            for b in args.yunchang_attn
        ]
    return methods


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Sweep:
    """The sweep on this rank: the peers, the cases, and (rank 0) the records."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = args.torch_device
        self.dtype = args.torch_dtype
        self.started = time.monotonic()
        self.records: list[dict] = []  # rank 0 only
        self.t1_ms: dict[tuple[int, int, str], float] = {}  # rank 0 only
        self.out_dir = Path(args.out)
        self.peers: dict[str, Peer] = {
            peer.family: peer
            for peer in (
                Usp(self.device),
                TorchContextParallel(self.device, args.torch_cp_rotate),
                YunChang(self.device),
            )
        }
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

    def meta(self) -> dict:
        settings = {k: v for k, v in vars(self.args).items() if not k.startswith("torch_")}
        return report.run_meta(settings, self.world, self.device, self.args.dtype)

    # -- one case

    def record(self, problem: Problem, method: Method, mode: str, **fields) -> None:
        """Rank 0 keeps and prints the case's figures; the other ranks only took part."""
        if self.rank != 0:
            return
        a = self.args
        rec = dict(
            family=method.family,
            label=method.label,
            backend=method.backend,
            kernel=method.kernel,
            ulysses=method.ulysses,
            ring=method.ring,
            impl=method.impl,
            gpus=method.gpus,
            mode=mode,
            seq_len=problem.seq_len,
            heads=a.heads,
            kv_heads=problem.kv_heads,
            head_dim=a.head_dim,
            batch=a.batch,
            dtype=a.dtype,
            status="ok",
            reason=None,
        )
        rec.update(fields)
        if rec["status"] == "ok":
            flops = attention_flops(a.batch, problem.seq_len, a.heads, a.head_dim, mode)
            rec["tflops_per_gpu"] = tflops_per_gpu(flops, rec["ms"], method.gpus)
            t1 = self.t1_ms.get((problem.seq_len, problem.kv_heads, mode))
            rec["t1_ms"] = t1
            rec["fraction_of_ideal"] = fraction_of_ideal(t1, rec["ms"], method.gpus) if t1 else None
        self.records.append(rec)
        self.log(report.format_case(rec, time.monotonic() - self.started))

    def measure(self, problem: Problem, method: Method, mode: str) -> dict:
        """Time this rank's shard, then its error against the reference; max over ranks."""
        memory = PeakMemory(self.device)
        peer = self.peers[method.family]
        with peer.open_shard(problem, method, mode == "fwdbwd") as shard:
            step = make_step(shard, mode)
            times = time_steps(step, self.args.warmup, self.args.iters, self.device, True)
            peak = memory.gib()
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
        return dict(
            ms=max(m for m, _ in each),
            ms_per_rank=[m for m, _ in each],
            times_ms_rank0=times,
            peak_gib=max(peaks) if peaks else None,
            **errors,
        )

    def run_case(self, problem: Problem, method: Method, mode: str) -> None:
        peer = self.peers.get(method.family)  # None for the one-GPU row
        skip = (peer.skip_reason(method, mode) if peer else None) or self.budget_spent()
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

    def reference_on_rank0(self, problem: Problem, grads: bool) -> str:
        """Rank 0: out (and grads) with the first reference backend that runs; returns its name."""
        failures = []
        for backend in self.args.ref_backends:
            try:
                shard = whole_sequence_shard(problem, backend, grads, self.device)
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
        memory = PeakMemory(self.device)
        shard = whole_sequence_shard(problem, method.backend, mode == "fwdbwd", self.device)
        times = time_steps(
            make_step(shard, mode), self.args.warmup, self.args.iters, self.device, False
        )
        peak = memory.gib()
        ms = statistics.median(times)
        return dict(ms=ms, ms_per_rank=[ms], times_ms_rank0=times, peak_gib=peak)

    # -- the sweep

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
        problem, reason = self.guarded(
            lambda: make_problem(
                seq_len, a.heads, kv_heads, a.head_dim, a.batch, a.seed, self.device, self.dtype
            )
        )
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
                    report.add_speedups(self.records)
                    report.write_json(self.out_dir / "bench.json", self.meta(), self.records)

    def finish(self) -> None:
        """Rank 0: the JSON, the plot, then the failures and the summary table last."""
        if self.rank != 0:
            return
        report.write_json(self.out_dir / "bench.json", self.meta(), self.records)
        png = report.plot_fractions(self.records, self.out_dir / "bench.png", self.meta())
        self.log(f"wrote {self.out_dir / 'bench.json'}, {png}, {self.out_dir / 'bench.log'}")
        self.log(report.format_failures(self.records))
        self.log(report.format_summary(self.records, self.meta()))
