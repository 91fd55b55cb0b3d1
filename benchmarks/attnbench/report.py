"""What a run leaves: one line per case, the summary table, the failures, JSON and the plot.

Rank 0 only; everything here reads the records (one dict per case, the JSON's
``records``), so ``--replot`` redraws a saved run without GPUs.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import usp_megatron

from .configs import MODES
from .flops import FLOP_CONVENTION


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_<peer>: the peer's best time at the same shape and mode over this time;
    for our rows also speedup_vs_yunchang_same_ur_kernel: YunChang's best at the same
    U x R with the same kernel (the like-for-like forward comparison)."""
    best: dict[tuple, float] = {}
    for r in records:
        if r["status"] == "ok" and r["family"] in ("torch_cp", "yunchang"):
            shape = (r["seq_len"], r["kv_heads"], r["mode"])
            for key in (
                (r["family"], *shape),
                (r["family"], *shape, r["ulysses"], r["ring"], r["kernel"]),
            ):
                best[key] = min(best.get(key, math.inf), r["ms"])
    for r in records:
        shape = (r["seq_len"], r["kv_heads"], r["mode"])
        for name, key in (
            ("torch_cp", ("torch_cp", *shape)),
            ("yunchang", ("yunchang", *shape)),
            ("yunchang_same_ur_kernel", ("yunchang", *shape, r["ulysses"], r["ring"], r["kernel"])),
        ):
            peer_ms = best.get(key)
            ok = r["status"] == "ok" and peer_ms is not None and r["family"] not in (key[0], "1gpu")
            r[f"speedup_vs_{name}"] = peer_ms / r["ms"] if ok else None


def _num(x: float | None, fmt: str) -> str:
    """``format(x, fmt)``, or a dash as wide when there is no figure."""
    width = fmt.split(".")[0]
    return format("-", f">{width}") if x is None else format(x, fmt)


def _grad_err(r: dict) -> float | None:
    errs = [r.get(f"err_{n}") for n in ("dq", "dk", "dv")]
    return max(errs) if all(e is not None for e in errs) else None


def format_case(r: dict, elapsed: float) -> str:
    head = (
        f"[{elapsed:6.1f}s] {r['mode']:6} kv{r['kv_heads']:<3} {r['seq_len']:>7} {r['label']:<38}"
    )
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()}: {r['reason']}"
    return (
        f"{head} {r['ms']:9.2f} ms {r['tflops_per_gpu']:6.1f} TF/s "
        f"ideal {_num(r['fraction_of_ideal'], '5.3f')} err {_num(r.get('err_out'), '.1e')}"
        f"/{_num(_grad_err(r), '.1e')} mem {_num(r['peak_gib'], '.2f')} GiB"
    )


def summary_rows(records: list[dict]) -> list[dict]:
    """Per shape and mode: the 1-GPU row, our best per (U x R, backend), each PyTorch CP
    backend, YunChang's best per (U x R, attn type); and one row, saying why, for a family
    none of whose cases ran there (every failure is listed by format_failures)."""
    family_order = {"1gpu": 0, "usp": 1, "torch_cp": 2, "yunchang": 3}
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (
            r["mode"],
            r["kv_heads"],
            r["seq_len"],
            family_order[r["family"]],
            r["ulysses"],
            r["ring"],
            r["backend"],
        )
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
            lines.append(
                f"{r['mode']:6} {r['kv_heads']:>3} {r['seq_len']:>7} "
                f"{r['family'] + ': no case ran':<38} {r['status']}: {r['reason'][:70]}"
            )
            continue
        head = f"{r['mode']:6} {r['kv_heads']:>3} {r['seq_len']:>7} {r['label']:<38}"
        cells = [
            format(r["ms"], "9.2f"),
            format(r["tflops_per_gpu"], "6.1f"),
            _num(r["fraction_of_ideal"], "6.3f"),
            _num(r.get("speedup_vs_torch_cp"), "6.2f"),
            _num(r.get("speedup_vs_yunchang"), "6.2f"),
            _num(r.get("err_out"), "8.1e"),
            _num(_grad_err(r), "8.1e"),
            _num(r["peak_gib"], "6.2f"),
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
    ok = [
        r
        for r in records
        if r["status"] == "ok" and r.get("fraction_of_ideal") is not None and r["family"] != "1gpu"
    ]
    if not ok:
        return "(no plot: no case with a fraction of ideal)"
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    kvs = sorted({r["kv_heads"] for r in ok}, reverse=True)  # MHA first
    fig, axes = plt.subplots(
        len(kvs), len(modes), figsize=(6.5 * len(modes), 4.5 * len(kvs)), squeeze=False
    )
    for (row, kv), (col, mode) in itertools.product(enumerate(kvs), enumerate(modes)):
        ax = axes[row][col]
        series: dict[str, dict[int, dict]] = {}
        for r in ok:
            if (r["mode"], r["kv_heads"]) != (mode, kv):
                continue
            name = {
                "usp": f"USP best ({r['kernel']})",
                "torch_cp": f"PyTorch CP ({r['kernel']})",
                "yunchang": f"YunChang best ({r['kernel']})",
            }[r["family"]]
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
                    ax.annotate(
                        f"{r['ulysses']}x{r['ring']} {r['impl']}",
                        (s, r["fraction_of_ideal"]),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(0, 6),
                        ha="center",
                    )
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


def run_meta(settings: dict, world_size: int, device: torch.device, dtype: str) -> dict:
    """The run's ``meta``: versions, machine, definitions of the figures, the settings."""
    meta = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        world_size=world_size,
        device=str(device),
        dtype=dtype,
        torch=torch.__version__,
        python=platform.python_version(),
        usp_megatron=getattr(usp_megatron, "__version__", None),
        argv=sys.argv[1:],
        flop_convention=FLOP_CONVENTION,
        ideal="T_1 / N, T_1 = one GPU running the whole problem with the reference backend",
        error="||x - x_1gpu|| / ||x_1gpu|| over the whole tensor, float32",
        peak_gib="max over ranks of max_memory_allocated during the case minus the "
        "memory allocated before it (inputs shards included)",
        ms="median of the timed iterations on each rank, max over ranks",
        settings=settings,
    )
    if device.type == "cuda":
        meta.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=str(torch.cuda.nccl.version()),
        )
    try:
        import yunchang

        meta["yunchang"] = yunchang.__version__
    except ImportError as exc:
        meta["yunchang"] = f"not importable: {exc}"
    return meta


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    """``{"meta": ..., "records": [...]}``, rewritten whole each time (a cut run keeps it)."""
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str))


def replot(path: Path) -> None:
    """Tables and plot again from a saved bench.json (no GPUs needed), next to it."""
    data = json.loads(path.read_text())
    records, meta = data["records"], data["meta"]
    print(plot_fractions(records, path.with_suffix(".png"), meta))
    print(format_summary(records, meta))
