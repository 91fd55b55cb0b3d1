"""Training speed of the GPT example on one GPU: a table of configurations (dense causal,
packed documents, sliding windows, megatron-core's own gradient norm) at given lengths,
and the longest sequence that trains (``--longest``).

Run from the repository root on a GPU machine:

    python benchmarks/bench_training.py --seq-lengths 16384 --out runs/train_16k
    python benchmarks/bench_training.py --seq-lengths 65536 --num-layers 8 \\
        --configs dense packed packed8 window4096 --out runs/train_64k
    python benchmarks/bench_training.py --longest --budget-s 300 --out runs/longest

(``--seq-lengths 16384 65536 --num-layers 24 8`` runs both tables in one worker.)

Table: every configuration at every ``--seq-lengths`` for ``--iters`` iterations (default
6); a row is the median of the steady iterations (the first ``--skip``, default 2, left
out): tokens/s, MFU, seconds per iteration, peak memory, host synchronisations per
iteration, and tokens/s against ``dense`` at the same length. Configurations: ``dense``,
``packed`` (the example corpus, cut at its end-of-document tokens), ``packed8`` (8 equal
documents per sample), ``window4096`` (``--window-size 4096 0``), ``window4096_flash`` (the
same on PyTorch's flash op alone), ``megatron_grad_norm`` (dense with megatron-core's own
per-tensor grad-norm fallback, ``--usp-no-foreach-grad-norm``: the pair with ``dense``).

``--longest``: with ``--recompute-granularity full`` (uniform, every layer), for
``window4096`` and then ``dense``, sequence lengths doubling from ``--start-seq-length``
(32K) up to ``--max-seq-length``, each trained ``--iters`` iterations (default 3, the first
left out of the speed); a series stops at its first failure (out of memory is the answer
it looks for). ``--budget-s`` bounds the whole sweep: each series gets an equal share of
what is left, and a length whose estimated time (the previous length's, scaled by the
FLOPs of attention over the keys a query sees) does not fit what is left of its series is
skipped, and the row says so. The command ends within about ``--budget-s`` + 60 s.

The model is the example's 1.3B GPT (24 layers, hidden 2048, 16 query / 8 key-value heads,
bf16, micro batch 1, one sequence per GPU) unless ``--num-layers`` says otherwise (one value,
or one per length). All runs
of a table (or of one ``--longest`` series) train in one torchrun worker process through
the example's ``train()``, so imports, the process group and the corpus are paid once; the
weights are drawn on the GPU (``--device-initialization``; ``--cpu-initialization`` for the
example's default, which builds the 1.3B parameters on the CPU first). Written to
``--out``: ``NAME.json`` (every row, every run's per-iteration history, each worker's
device and the tail of its log: the one file to bring back) and ``NAME.WORKER.log`` (the
example's own output, one per worker process). ``--extra`` passes flags to every run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt"
WINDOW = ["--window-size", "4096", "0"]
CONFIGS: dict[str, list[str]] = {
    "dense": [],
    "packed": ["--pack-documents"],
    "packed8": ["--pack-documents", "--pack-documents-per-sample", "8"],
    "window4096": WINDOW,
    "window4096_flash": [*WINDOW, "--usp-attn-backend", "torch_flash"],
    "megatron_grad_norm": ["--usp-no-foreach-grad-norm"],
}
TABLE_CONFIGS = ["dense", "packed", "packed8", "window4096", "megatron_grad_norm"]
# Cheapest first: the dense series gets what the windowed one leaves of the budget.
LONGEST_SERIES = ("window4096", "dense")
RECOMPUTE_FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                  "--recompute-num-layers", "1"]  # fmt: skip
MODEL = {"hidden": 2048, "heads": 16, "kv_heads": 8, "vocab": 384}  # vocab: bytes, padded
LOG_TAIL_LINES = 80


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=TABLE_CONFIGS)
    parser.add_argument(
        "--num-layers",
        type=int,
        nargs="+",
        default=[24],
        help="one for every length, or one per --seq-lengths entry (e.g. 24 8 for 16K 64K)",
    )
    parser.add_argument("--iters", type=int, default=None, help="default 6; --longest 3")
    parser.add_argument(
        "--skip", type=int, default=None, help="warm-up iterations not counted (2; --longest 1)"
    )
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--longest", action="store_true", help="the longest-sequence sweep")
    parser.add_argument("--start-seq-length", type=int, default=32768)
    parser.add_argument("--max-seq-length", type=int, default=262144)
    parser.add_argument("--budget-s", type=float, default=300.0, help="--longest: seconds")
    parser.add_argument(
        "--cpu-initialization",
        action="store_true",
        help="build the weights on the CPU first (the example's default; slower start)",
    )
    parser.add_argument("--out", default="runs/train_speed", help="directory for the results")
    parser.add_argument("--name", default=None, help="NAME.json (train_speed / train_longest)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a worker's spec
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="example flags")
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    args.iters = args.iters if args.iters is not None else (3 if args.longest else 6)
    args.skip = args.skip if args.skip is not None else (1 if args.longest else 2)
    args.name = args.name or ("train_longest" if args.longest else "train_speed")
    if not 0 <= args.skip < args.iters or args.iters < 2:
        parser.error(f"--iters {args.iters} must be at least 2 and above --skip {args.skip}")
    per_length = len(args.num_layers) == len(args.seq_lengths) and not args.longest
    if len(args.num_layers) != 1 and not per_length:
        layers = " ".join(map(str, args.num_layers))
        parser.error(
            f"--num-layers {layers}: give one value, or (a table) one per --seq-lengths entry"
        )
    if args.longest and args.gpus != 1:
        parser.error(f"--longest measures one GPU (an out-of-memory rank would leave the "
                     f"others waiting): drop --gpus {args.gpus}")  # fmt: skip
    if args.longest and not 0 < args.start_seq_length <= args.max_seq_length:
        parser.error(f"--start-seq-length {args.start_seq_length} must be positive and at "
                     f"most --max-seq-length {args.max_seq_length}")  # fmt: skip
    return args


def layers_at(args: argparse.Namespace, seq_len: int) -> int:
    """The model's layers at this length (--num-layers: one, or one per length)."""
    if len(args.num_layers) == 1:
        return args.num_layers[0]
    return args.num_layers[args.seq_lengths.index(seq_len)]


def example_argv(args: argparse.Namespace, config: str, seq_len: int) -> list[str]:
    """The example's flags for one run."""
    flags = [
        "--num-layers", str(layers_at(args, seq_len)), "--hidden-size", str(MODEL["hidden"]),
        "--num-attention-heads", str(MODEL["heads"]), "--num-query-groups",
        str(MODEL["kv_heads"]), "--seq-length", str(seq_len), "--micro-batch-size", "1",
        "--global-batch-size", str(args.gpus), "--bf16", "--train-iters", str(args.iters),
        "--lr-warmup-iters", "1", "--usp-ulysses-degree", str(args.gpus), *CONFIGS[config],
    ]  # fmt: skip
    flags += RECOMPUTE_FULL if args.longest else ["--count-host-syncs"]
    if not args.cpu_initialization:
        flags.append("--device-initialization")
    return flags + args.extra


def iteration_flops(seq_len: int, window: int | None, num_layers: int) -> float:
    """FLOPs of one sequence's iteration, with attention over the keys a causal query sees
    (half the sequence on average; about the window with one): what the time of an
    iteration scales with from one length to the next."""
    h, a, g, vocab = MODEL["hidden"], MODEL["heads"], MODEL["kv_heads"], MODEL["vocab"]
    d, ffn = h // a, 4 * h
    if window is None or window >= seq_len:
        keys = seq_len / 2
    else:
        keys = window - window * window / (2 * seq_len)
    dense_part = 12 * num_layers * h * h * ((1 + g / a) * (a * d / h) + ffn / h) + 6 * h * vocab
    return seq_len * (dense_part + 12 * num_layers * a * d * keys)


# ---------------------------------------------------------------------------- the worker


def _write(path: Path, data: dict) -> None:
    """Whole or not at all: a worker killed mid-write leaves the previous version."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


def _failure(error: BaseException) -> tuple[str, bool]:
    """One line for the record, and whether it is an out-of-memory."""
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    oom = "out of memory" in str(error).lower() or "ALLOC_FAILED" in str(error)
    return text, oom or type(error).__name__ == "OutOfMemoryError"


class Worker:
    """Runs the example's ``train()`` for each run of a spec, in this torchrun process."""

    def __init__(self, spec: dict) -> None:
        sys.path.insert(0, str(EXAMPLE))
        import torch
        import torch.distributed as dist
        from arguments import parse_args as example_args
        from preflight import ConfigError, check_configuration, use_cuda
        from report import banner
        from training import train

        self.torch, self.dist, self.spec = torch, dist, spec
        self.example_args, self.ConfigError = example_args, ConfigError
        self.check_configuration, self.banner, self.train = check_configuration, banner, train
        self.cuda = use_cuda(example_args(spec["runs"][0]["argv"]))
        if self.cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if self.cuda else "gloo")
        self.rank = dist.get_rank()
        self.out = {"device": torch.cuda.get_device_name() if self.cuda else "cpu",
                    "torch": torch.__version__, "runs": []}  # fmt: skip

    def run(self, run: dict) -> dict:
        """One run: its history, or what stopped it."""
        torch = self.torch
        record = dict(run, history=[], error=None, oom=False)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            record["memory_at_start_gib"] = torch.cuda.memory_allocated() / 2**30
        start = time.perf_counter()
        try:
            args = self.example_args(run["argv"])
            plan = self.check_configuration(args, self.dist.get_world_size())
            if self.rank == 0:
                print(f"==== {run['config']} at {run['seq_len']} tokens", flush=True)
                print(self.banner(args, plan), flush=True)
            record["history"] = self.train(args)
        except self.ConfigError as error:
            record["error"] = f"refused: {error}"
        except (torch.OutOfMemoryError, RuntimeError) as error:
            record["error"], record["oom"] = _failure(error)
        record["wall_s"] = time.perf_counter() - start
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        if self.rank == 0:
            print(f"==== {run['config']} at {run['seq_len']}: {record['error'] or 'done'} "
                  f"in {record['wall_s']:.1f} s", flush=True)  # fmt: skip
        return record

    def save(self, record: dict) -> None:
        self.out["runs"].append(record)
        if self.rank == 0:
            _write(Path(self.spec["result"]), self.out)


def _estimate_s(previous: dict, seq_len: int, iters: int, window: int | None) -> float:
    """Seconds for ``seq_len``: the previous run's time outside its iterations, its first
    iteration's extra, and its steady iteration scaled by the FLOPs."""
    seconds = [r["seconds"] for r in previous["history"]]
    steady = statistics.median(seconds[1:])
    layers = previous["num_layers"]
    scale = iteration_flops(seq_len, window, layers) / iteration_flops(
        previous["seq_len"], window, layers
    )
    overhead = previous["wall_s"] - sum(seconds) + seconds[0] - steady
    return 1.1 * (overhead + iters * steady * scale)


def skip_reason(previous: dict | None, seq_len: int, spec: dict, left: float) -> str | None:
    """Why a --longest series does not try ``seq_len`` with ``left`` seconds of its budget
    (None: try it). The first length is tried whenever any budget is left."""
    if previous is None:
        return None if left > 0 else "no budget left for this series"
    estimate = _estimate_s(previous, seq_len, spec["iters"], spec["window"])
    if estimate > left:
        return (
            f"estimated {estimate:.0f} s, {max(left, 0):.0f} s of the budget left for this series"
        )
    return None


def worker_main(spec: dict) -> int:
    """A table (every run in order) or a --longest series (doubling until it fails or
    the estimate does not fit the deadline)."""
    worker = Worker(spec)
    if spec["mode"] == "table":
        for run in spec["runs"]:
            worker.save(worker.run(run))
    else:
        previous = None
        for run in spec["runs"]:
            reason = skip_reason(previous, run["seq_len"], spec, spec["deadline"] - time.time())
            if reason is not None:
                worker.save(dict(run, skipped=reason))
                break
            record = worker.run(run)
            worker.save(record)
            if record["error"] is not None:
                break
            previous = record
    worker.dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------- the parent


def summarize(record: dict, skip: int) -> dict:
    """A table row from a run's record."""
    row = {k: record[k] for k in ("worker", "config", "seq_len", "num_layers")}
    for key in ("skipped", "error", "oom", "wall_s", "memory_at_start_gib"):
        if record.get(key) is not None:
            row[key] = record[key]
    history = record.get("history") or []
    if not history:
        return row
    steady = history[skip:] or history
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
    row["s_per_it"] = statistics.median(r["seconds"] for r in steady)
    row["tflops_per_gpu"] = statistics.median(r["tflops_per_gpu"] for r in steady)
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    row["mfu"] = statistics.median(mfu) if mfu else None
    documents = [r["documents_per_sample"] for r in steady if "documents_per_sample" in r]
    row["documents_per_sample"] = statistics.mean(documents) if documents else None
    syncs = [r["host_syncs"] for r in steady if "host_syncs" in r]
    row["host_syncs_per_it"] = statistics.median(syncs) if syncs else None
    row["host_sync_sites"] = steady[-1].get("host_sync_sites")
    row["peak_memory_gib"] = max(r["peak_memory_bytes"] or 0 for r in history) / 2**30
    row["iterations"] = len(history)
    return row


def run_worker(args: argparse.Namespace, name: str, spec: dict, timeout_s: float | None,
               bundle: dict) -> None:  # fmt: skip
    """One torchrun worker process; its records join ``bundle`` (rows, runs, log tail)."""
    out = Path(args.out)
    result = out / f"{args.name}.{name}.json"
    log = out / f"{args.name}.{name}.log"
    spec = dict(spec, result=str(result))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.gpus}", str(Path(__file__).resolve()),
               "--worker", json.dumps(spec)]  # fmt: skip
    start = time.perf_counter()
    with log.open("w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # torchrun passes SIGTERM on to its workers (each in a session of its own, where
            # a kill of torchrun alone would leave them holding the GPU).
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            rc = f"stopped after {timeout_s:.0f} s (--budget-s)"
    worker = json.loads(result.read_text()) if result.exists() else {"runs": []}
    result.unlink(missing_ok=True)
    lines = log.read_text(errors="replace").splitlines()
    worker.update(rc=rc, wall_s=round(time.perf_counter() - start, 1),
                  log_tail=lines[-LOG_TAIL_LINES:])  # fmt: skip
    bundle["workers"][name] = worker
    for record in worker["runs"]:
        bundle["rows"].append(summarize(dict(record, worker=name), args.skip))
    ran = {(r["config"], r["seq_len"]) for r in worker["runs"]}
    for run in spec["runs"]:
        if (run["config"], run["seq_len"]) not in ran and spec["mode"] == "table":
            entry = {k: run[k] for k in ("config", "seq_len", "num_layers")}
            bundle["rows"].append(dict(entry, worker=name, error=f"not run (worker exit {rc})"))
    _write(out / f"{args.name}.json", bundle)


def _run_entry(args: argparse.Namespace, config: str, seq_len: int) -> dict:
    return {"config": config, "seq_len": seq_len, "num_layers": layers_at(args, seq_len),
            "argv": example_argv(args, config, seq_len)}  # fmt: skip


def print_rows(rows: list[dict]) -> None:
    dense = {r["seq_len"]: r.get("tokens_per_s") for r in rows if r["config"] == "dense"}
    print(f"\n{'config':<19} {'seq':>7} {'docs':>5} {'tok/s':>9} {'MFU':>6} {'s/it':>7} "
          f"{'GiB':>6} {'vs dense':>8} {'syncs/it':>8}")  # fmt: skip
    for r in rows:
        head = f"{r['config']:<19} {r['seq_len']:>7}"
        if "tokens_per_s" not in r:
            why = r.get("skipped") or r.get("error")
            print(f"{head} {'out of memory' if r.get('oom') else 'not measured'}: {why}")
            continue
        base = dense.get(r["seq_len"])
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        docs = f"{r['documents_per_sample']:.0f}" if r["documents_per_sample"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        syncs = "-" if r["host_syncs_per_it"] is None else f"{r['host_syncs_per_it']:g}"
        print(f"{head} {docs:>5} {r['tokens_per_s']:>9,.0f} {mfu:>6} {r['s_per_it']:>7.3f} "
              f"{r['peak_memory_gib']:>6.1f} {ratio:>8} {syncs:>8}")  # fmt: skip


def longest_summary(rows: list[dict]) -> list[str]:
    """Per series: the longest length that trained, and what stopped the series."""
    lines = []
    for series in LONGEST_SERIES:
        mine = [r for r in rows if r["config"] == series]
        if not mine:
            continue
        trained = [r for r in mine if "tokens_per_s" in r]
        best = max(trained, key=lambda r: r["seq_len"]) if trained else None
        stop = next((r for r in mine if "tokens_per_s" not in r), None)
        text = f"{series}: longest {best['seq_len']} tokens" if best else f"{series}: none"
        if best:
            text += (f" ({best['tokens_per_s']:,.0f} tok/s, {best['peak_memory_gib']:.1f} GiB "
                     "peak)")  # fmt: skip
        if stop is not None:
            why = "out of memory" if stop.get("oom") else stop.get("skipped") or stop.get("error")
            text += f"; {stop['seq_len']}: {why}"
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(json.loads(args.worker))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = {"name": args.name, "command": [sys.executable, *sys.argv],
              "mode": "longest" if args.longest else "table", "skip": args.skip,
              "rows": [], "workers": {}}  # fmt: skip
    if not args.longest:
        runs = [_run_entry(args, c, s) for s in args.seq_lengths for c in args.configs]
        run_worker(args, "table", {"mode": "table", "runs": runs}, None, bundle)
        print_rows(bundle["rows"])
    else:
        deadline = time.time() + args.budget_s
        lengths = []
        while (length := args.start_seq_length * 2 ** len(lengths)) <= args.max_seq_length:
            lengths.append(length)
        for index, series in enumerate(LONGEST_SERIES):
            left = deadline - time.time()
            if left <= 0:
                bundle["rows"].append({**_run_entry(args, series, lengths[0]), "worker": series,
                                       "skipped": "no budget left for this series"})  # fmt: skip
                continue
            spec = {"mode": "longest", "iters": args.iters,
                    "window": 4096 if series.startswith("window") else None,
                    "deadline": time.time() + left / (len(LONGEST_SERIES) - index),
                    "runs": [_run_entry(args, series, s) for s in lengths]}  # fmt: skip
            run_worker(args, series, spec, left + 60, bundle)
        print_rows(bundle["rows"])
        bundle["summary"] = longest_summary(bundle["rows"])
        print("\n" + "\n".join(bundle["summary"]))
        _write(out / f"{args.name}.json", bundle)
    print(f"\nwrote {out / (args.name + '.json')} and {args.name}.*.log in {out}")
    failed = [r for r in bundle["rows"] if r.get("error") and not r.get("oom")]
    return 1 if failed or any(w["rc"] != 0 for w in bundle["workers"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
