"""What a run says about itself: the start-up banner, a line per logged iteration, the
closing summary, and TensorBoard scalars.

The log follows Megatron-LM's conventions: model FLOP/s per GPU from the standard dense
GPT formula (:func:`gpt_flops_per_iteration`), MFU against the device's bf16 dense peak
(``--peak-tflops``), and peak memory (CUDA max allocated; the process's max RSS on CPU).
"""

from __future__ import annotations

import argparse
import resource
import sys

import torch
from megatron.core.transformer.utils import is_layer_window_attention
from preflight import Plan

from usp_megatron.checks import check_window
from usp_megatron.heads import head_split
from usp_megatron.megatron.arguments import usp_enabled, usp_layout

# bf16 dense (no sparsity) TFLOP/s by device name, first match wins ("H100 PCIe" before
# "H100", whose SXM part is 989). Unknown devices report no MFU unless --peak-tflops is given.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("B200", 2250.0),
)
_GIB = 1 << 30


def add_report_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="per-GPU peak for MFU; default: the device's bf16 dense peak where known "
        "(H100/H200 SXM 989, A100 312), none on CPU (then no MFU)",
    )
    group.add_argument(
        "--tensorboard-dir",
        default=None,
        help="write loss, grad norm, learning rate and throughput scalars here (needs the "
        "tensorboard package: pip install 'usp_megatron[tensorboard]')",
    )
    return parser


def gpt_flops_per_iteration(
    *,
    batch: int,
    seq_length: int,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    ffn_hidden_size: int,
    vocab_size: int,
) -> float:
    """Model FLOPs of one training iteration: Megatron-LM's dense GPT formula, causal.

        12 B s L h^2 [ (1 + g/a + s/(2h)) (a d / h) + f/h + V / (2 L h) ]

    ``B`` sequences of ``s`` tokens, ``L`` layers, hidden ``h``, ``a`` query and ``g``
    key/value heads of dimension ``d = h // a``, MLP hidden ``f``, padded vocabulary ``V``.
    Per token and layer the forward pass multiplies by the QKV and output projections
    (``4 h a d (1 + g/a)``), by ``Q K^T`` and the values over half the sequence on average
    (causal: ``2 a d s``) and by the MLP (``4 h f``); the logits add ``2 h V`` per token.
    ``12`` = 2 FLOPs per multiply-add x 3 (forward, and backward for data and weights)
    x 2 (the factor pulled out of every term). Recomputation is not counted: this is
    model FLOPs, so MFU does not reward recomputing.
    """
    h, a, g, s = hidden_size, num_attention_heads, num_query_groups, seq_length
    d = h // a
    attention = (1 + g / a + s / (2 * h)) * (a * d / h)
    mlp = ffn_hidden_size / h
    logits = vocab_size / (2 * num_layers * h)
    return 12.0 * batch * s * num_layers * h * h * (attention + mlp + logits)


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    """The per-GPU peak MFU is measured against, and where it comes from."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak on CPU; --peak-tflops sets one"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak, f"{name} bf16 dense peak"
    return None, f"peak of {name} unknown; --peak-tflops sets one"


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPUs; the process's max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _flops_text(tflops: float, device: torch.device) -> str:
    """Megatron-LM's TFLOP/s per GPU; GFLOP/s per rank on CPU, where TFLOP/s reads 0.000."""
    if device.type == "cuda":
        return f"{tflops:.3g} TFLOP/s/GPU"
    return f"{1e3 * tflops:.3g} GFLOP/s/rank"


def _memory_label(device: torch.device) -> str:
    return "max mem" if device.type == "cuda" else "max RSS"


def _size(num_bytes: float) -> str:
    if num_bytes >= _GIB:
        return f"{num_bytes / _GIB:.2f} GiB"
    return f"{num_bytes / (1 << 20):.0f} MiB"


class Reporter:
    """Turns each iteration's numbers into a history record, a log line on rank 0 every
    ``--log-interval``, and TensorBoard scalars (rank 0, every iteration)."""

    def __init__(
        self, args: argparse.Namespace, plan: Plan, padded_vocab_size: int, rank: int
    ) -> None:
        self.args, self.plan, self.rank = args, plan, rank
        self.flops = gpt_flops_per_iteration(
            batch=args.global_batch_size,
            seq_length=args.seq_length,
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups,
            ffn_hidden_size=args.ffn_hidden_size,
            vocab_size=padded_vocab_size,
        )
        self.peak, _ = peak_tflops(args, plan.device)
        self.writer = None
        if rank == 0 and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir)

    def record(
        self,
        iteration: int,
        loss: float,
        grad_norm: float,
        lr: float,
        seconds: float,
        documents_per_sample: float | None = None,
    ) -> dict:
        """One iteration's metrics (``documents_per_sample``: packed documents only)."""
        tflops = self.flops / self.plan.world_size / seconds / 1e12
        record = {
            "iteration": iteration,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "seconds": seconds,
            "tokens_per_s": self.args.global_batch_size * self.args.seq_length / seconds,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "peak_memory_bytes": peak_memory_bytes(self.plan.device),
        }
        if documents_per_sample is not None:
            record["documents_per_sample"] = documents_per_sample
        if self.rank == 0:
            if iteration % self.args.log_interval == 0:
                print(self.log_line(record), flush=True)
            if self.writer is not None:
                self._write_scalars(record)
        return record

    def log_line(self, r: dict) -> str:
        total = self.args.train_iters
        eta = (total - r["iteration"]) * r["seconds"]
        mfu = f" | MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        return (
            f"iter {r['iteration']:>5}/{total} ({100 * r['iteration'] / total:5.1f}%) | "
            f"loss {r['loss']:.6f} | grad norm {r['grad_norm']:.4f} | lr {r['lr']:.2e} | "
            f"{r['tokens_per_s']:,.0f} tok/s | {_flops_text(r['tflops_per_gpu'], self.plan.device)}"
            f"{mfu} | "
            f"{_memory_label(self.plan.device)} {_size(r['peak_memory_bytes'])} | "
            f"{r['seconds']:.2f} s/it | eta {eta:.0f}s"
            + (f" | {r['documents_per_sample']:.1f} documents/sample"
               if "documents_per_sample" in r else "")
        )  # fmt: skip

    def _write_scalars(self, r: dict) -> None:
        """Megatron-LM's scalar names, against the iteration."""
        step = r["iteration"]
        scalars = {
            "lm loss": r["loss"],
            "grad-norm": r["grad_norm"],
            "learning-rate": r["lr"],
            "iteration-time": r["seconds"],
            "throughput/tokens-per-sec": r["tokens_per_s"],
            "throughput/tflops-per-gpu": r["tflops_per_gpu"],
            "mem-max-bytes": r["peak_memory_bytes"],
        }
        if r["mfu"] is not None:
            scalars["throughput/mfu"] = r["mfu"]
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def nothing_to_do(args: argparse.Namespace, iteration: int) -> str:
    return (
        f"nothing to do: the checkpoint in {args.load} is at iteration {iteration} and "
        f"--train-iters is {args.train_iters}; raise --train-iters to train further"
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}{'es' if noun.endswith('s') else 's'}"


def _ranges(positions: list[int], offset: int = 0) -> str:
    """``0-15, 112-127``; long runs of single positions (stripe) shortened. ``offset`` is
    added to every number shown (layers count from 1)."""
    runs: list[list[int]] = []
    for p in (p + offset for p in positions):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    text = [f"{a}-{b}" if a != b else f"{a}" for a, b in runs]
    if len(text) > 4:
        text = [*text[:3], "...", text[-1]]
    return ", ".join(text)


def _layout(args: argparse.Namespace) -> str:
    if not usp_enabled(args):
        return "no context parallelism: every rank holds whole sequences"
    layout = usp_layout(args)
    rank0 = layout.positions(args.seq_length, 0, 0).tolist()
    return f"{layout.name}: {layout.describe()}; rank 0 holds {_ranges(rank0)}"


def _heads(args: argparse.Namespace, u: int) -> str:
    """Heads per rank after the ulysses all-to-all: one count when ``U`` splits them
    evenly, every ulysses rank's when it does not (and what the busiest rank costs)."""
    tp = args.tensor_model_parallel_size
    split = head_split(args.num_attention_heads // tp, args.num_query_groups // tp, u)
    model = f"(model: {args.num_attention_heads} / {args.num_query_groups})"
    if split.even:
        return f"heads {split.q_heads[0]} query / {split.kv_heads[0]} key-value {model}"
    return (
        f"heads {'/'.join(map(str, split.q_heads))} query / "
        f"{'/'.join(map(str, split.kv_heads))} key-value on ulysses ranks 0-{u - 1} {model}: "
        f"uneven, the busiest rank computes {split.imbalance:.2f}x the mean"
    )


def _window(args: argparse.Namespace) -> str | None:
    """The sliding window and the layers that use it (Megatron's rule), None without one."""
    window = check_window(None if args.window_size is None else tuple(args.window_size))
    if window is None:
        return None
    left = "all earlier tokens" if window[0] < 0 else f"tokens i-{window[0]} .. i"
    layers = [
        n
        for n in range(1, args.num_layers + 1)
        if is_layer_window_attention(window, args.window_attn_skip_freq, n)
    ]
    where = "every layer" if len(layers) == args.num_layers else (
        f"layers {_ranges([n - 1 for n in layers], offset=1)} of {args.num_layers} (those "
        f"numbered a multiple of {args.window_attn_skip_freq} attend globally)"
    )  # fmt: skip
    return f"{window[0]} {window[1]}: token i sees {left}, on {where}"


def _recompute(args: argparse.Namespace) -> str:
    """What the backward runs again, in the banner's words."""
    granularity, n, total = args.recompute_granularity, args.recompute_num_layers, args.num_layers
    if granularity is None:
        return "none: every activation is kept (--recompute-granularity full|selective)"
    if granularity == "full" and args.recompute_method == "uniform":
        return (
            f"full, uniform: every layer runs again in the backward, from the kept input of "
            f"each chunk of {_count(n, 'layer')}"
        )
    if granularity == "full":
        return f"full, block: the first {n} of {total} layers run again in the backward"
    modules = args.recompute_modules or ["core_attn"]
    text = f"selective: {', '.join(modules)} run again in the backward of every layer"
    if "core_attn" in modules and usp_enabled(args) and not args.megatron_attention:
        text += " (core_attn is USP attention: its all-to-all and ring run again too)"
    return text


def banner(args: argparse.Namespace, plan: Plan) -> str:
    """What this run will do, printed by rank 0 before anything is built."""
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    backend = "nccl" if plan.device.type == "cuda" else "gloo"
    if usp_enabled(args):
        u = args.usp_ulysses_degree
        cp_text = f"CP {cp} (USP: Ulysses U {u} x Ring R {args.usp_ring_degree})"
    else:
        u, cp_text = 1, f"CP {cp}"
    peak, peak_source = peak_tflops(args, plan.device)
    mfu = f"MFU against {peak:g} TFLOP/s ({peak_source})" if peak else f"no MFU ({peak_source})"
    data = plan.data
    tokens = args.global_batch_size * args.seq_length
    warmup = f"warmup {args.lr_warmup_iters}"
    decay = (
        "" if args.lr_decay_iters == args.train_iters else f" to iteration {args.lr_decay_iters}"
    )
    outputs = [
        "log: stdout (rank 0)",
        f"history: {args.history_json or '- (--history-json)'}",
        f"checkpoints: {args.save or '- (--save)'}"
        + (f" every {args.save_interval}" if args.save and args.save_interval else ""),
        f"tensorboard: {args.tensorboard_dir or '- (--tensorboard-dir)'}",
    ]
    lines = [
        f"USP GPT pretraining | {_count(plan.world_size, 'process')}, {plan.device.type} "
        f"({backend}), {str(plan.dtype).removeprefix('torch.')}",
        f"parallel   TP {tp} x {cp_text} x DP {plan.data_parallel_size}",
        f"layout     {_layout(args)}",
        f"attention  kernel {plan.kernel} ({plan.kernel_reason})",
        f"per rank   {args.seq_length // cp} of {args.seq_length} tokens of each sequence; "
        f"{_heads(args, u)}",
        f"model      {args.num_layers} layers, hidden {args.hidden_size}, ffn "
        f"{args.ffn_hidden_size}, {args.position_embedding_type}, vocab {data.vocab_size}",
        f"data       {data.description}: {data.documents:,} documents, {data.tokens:,} tokens"
        + (f" ({data.prefix})" if args.data_path is None else ""),
        f"training   {_count(args.train_iters, 'iteration')} x "
        f"{_count(args.global_batch_size, 'sequence')} "
        f"(micro-batch {args.micro_batch_size}) = {tokens:,} tokens each; {args.optimizer}, "
        f"lr {args.lr:.1e} -> {args.min_lr:.1e} cosine{decay}, {warmup}; {mfu}",
        f"recompute  {_recompute(args)}",
        f"grad norm  {plan.grad_norm}",
        f"outputs    {'; '.join(outputs)}",
    ]
    window = _window(args)
    if window is not None:
        lines.insert(6, f"window     {window}")
    if plan.resume is not None:
        lines.append(f"resume     {plan.resume}")
    if plan.ignored:
        lines.append(f"ignored    {'; '.join(plan.ignored)}")
    return "\n".join(lines)


def summary(args: argparse.Namespace, plan: Plan, history: list[dict], wall_seconds: float) -> str:
    """The closing lines: time, mean speed after the first iteration (which pays for
    warm-up and allocation), final loss, what was written."""
    steady = history[1:] or history
    seconds = sum(r["seconds"] for r in steady)
    tokens = args.global_batch_size * args.seq_length * len(steady)
    tflops = sum(r["tflops_per_gpu"] * r["seconds"] for r in steady) / seconds
    speed = f"{tokens / seconds:,.0f} tok/s, {_flops_text(tflops, plan.device)}"
    peak, _ = peak_tflops(args, plan.device)
    if peak:
        speed += f", MFU {100 * tflops / peak:.1f}%"
    excluded = " (first iteration excluded)" if len(history) > 1 else ""
    written = []
    if args.history_json:
        written.append(f"history {args.history_json}")
    if args.save:
        written.append(f"checkpoint of iteration {history[-1]['iteration']} in {args.save}")
    if args.tensorboard_dir:
        written.append(f"tensorboard {args.tensorboard_dir}")
    if not written:
        written.append("nothing (no --history-json, --save or --tensorboard-dir)")
    return (
        f"done: {_count(len(history), 'iteration')} in {wall_seconds:.1f} s wall; mean {speed}"
        f"{excluded}; final loss {history[-1]['loss']:.6f}; {_memory_label(plan.device)} "
        f"{_size(max(r['peak_memory_bytes'] for r in history))} (rank 0)\n"
        f"wrote: {'; '.join(written)}"
    )
