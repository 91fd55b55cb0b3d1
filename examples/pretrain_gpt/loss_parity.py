"""Loss parity: the same model, data and seed trained with data parallelism only and with
USP layouts; per-step loss and gradient norm must agree.

    python examples/pretrain_gpt/loss_parity.py              # CPU, float32, CI-sized
    python examples/pretrain_gpt/loss_parity.py --world-size 4 --configs U2R2-zigzag \
        --models mha --rtol 2e-2 --smooth 10 --baseline-attention usp \
        --out docs/loss_parity_gpu_bf16 -- --device cuda --bf16 --optimizer adam ...

With ``--noise-config TP2-U1R1-zigzag`` (tensor parallelism instead of DP only: the same
model, only the order of reductions changes) the deviation of that run from DP is the noise
band of the precision, and each USP run must stay within ``--noise-factor`` (2) times it:
what a bf16 comparison on GPUs needs, where a fixed tolerance says little.

A configuration is ``[TP<t>-]U<u>R<r>-<impl>`` (e.g. ``U2R2-stripe``, ``TP2-U2R1-zigzag``);
the baseline is ``DP``: every rank a data-parallel replica (with tensor parallelism, DP at
the same TP size, so that only USP differs). All runs share one world of
processes (gloo on CPU, NCCL on GPUs). Writes ``<out>.json`` and ``<out>.png``; exits 1
when any step differs by more than ``--rtol``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from arguments import parse_args
from preflight import ConfigError, check_configuration, use_cuda
from training import train

from usp_megatron.testing import run_distributed

DEFAULT_CONFIGS = (
    "U4R1-zigzag,U2R2-basic,U2R2-zigzag,U2R2-stripe,U1R4-zigzag,U1R4-stripe,TP2-U2R1-zigzag"
)
MEGATRON_DOCUMENTS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
MODELS = {
    "mha": [],
    "gqa": ["--num-query-groups", "2"],
    "swa": ["--window-size", "8", "0"],  # every layer in a window of 8 of the 64 tokens
    "swa-alt": ["--window-size", "8", "0", "--window-attn-skip-freq", "2"],  # local, global
    # Packed documents (THD), every document padded to a multiple of 8 in every run (the
    # same samples for every layout); and the negative control: documents that see each other.
    "packed": ["--pack-documents", "--pack-pad-multiple", "8"],
    "packed-nomask": ["--pack-documents", "--pack-pad-multiple", "8", "--no-document-mask"],
    # Megatron-LM's document flags: the same packing, position ids and loss mask as "packed",
    # made by the dataset.
    "megatron-docs": [*MEGATRON_DOCUMENTS, "--pack-pad-multiple", "8"],
}
#: Models checked on fewer layouts (one per U x R) to keep the default run CI-sized, and
#: whose DP baseline runs USP's attention at context-parallel size 1 (Megatron's own
#: sliding-window mask is built on a CUDA device; its DotProductAttention takes no packed
#: sequences).
SHORT_MODELS = {
    "swa": "U4R1-zigzag,U2R2-stripe,U1R4-basic",
    "swa-alt": "U2R2-zigzag",
    "packed": "U4R1-zigzag,U2R2-zigzag,U1R4-zigzag",
    "packed-nomask": "U2R2-zigzag",
    "megatron-docs": "U2R2-zigzag",
}
# Small enough for CI on 2 cores (the driver's own defaults are the CPU demo). SGD, because
# Adam's first steps move every weight by about +-lr whatever its gradient's size, so a
# gradient entry that is pure float32 rounding noise (it cancels to ~0) gets a full step
# of random sign: two correct runs then differ by ~1e-6 in gradient norm. SGD keeps the
# comparison about the parallel layout. Pass "-- --optimizer adam" to see it with Adam.
QUICK = [
    "--train-iters", "6", "--seq-length", "64", "--global-batch-size", "8",
    "--optimizer", "sgd", "--lr", "0.1", "--lr-warmup-iters", "1", "--log-interval", "1000",
]  # fmt: skip
_CONFIG = re.compile(r"^(?:TP(\d+)-)?U(\d+)R(\d+)-(basic|zigzag|stripe)$")


def config_flags(name: str, baseline_attention: str) -> list[str]:
    """Driver flags of one configuration name."""
    if name == "DP":
        return ["--megatron-attention"] if baseline_attention == "megatron" else []
    match = _CONFIG.match(name)
    if match is None:
        raise ValueError(
            f"configuration {name!r} is not DP or [TP<t>-]U<u>R<r>-<basic|zigzag|stripe>"
        )
    tp, u, r, impl = match.groups()
    return [
        "--tensor-model-parallel-size", tp or "1",
        "--usp-ulysses-degree", u, "--usp-ring-degree", r, "--usp-ring-impl", impl,
    ]  # fmt: skip


def run_world(runs: list[tuple[str, list[str]]], smooth: int = 1) -> dict[str, list[dict]]:
    """Every run in this world, grouped so each parallel layout is built once (``DP``
    sorts first, so each run is compared with its baseline as soon as it ends)."""
    histories = {}
    ordered = sorted(runs, key=lambda run: run[0].split("/")[1])
    for index, (name, argv) in enumerate(ordered, 1):
        _progress(f"[{index:>2}/{len(ordered)}] {name}: started")
        start = time.perf_counter()
        histories[name] = train(parse_args(argv))
        line = f"[{index:>2}/{len(ordered)}] {name}: done in {time.perf_counter() - start:.1f} s"
        base = histories.get(name.split("/")[0] + "/DP")
        if base is not None and not name.endswith("/DP"):
            deviation = {
                key: max(
                    rel_diff(
                        moving_average([h[key] for h in histories[name]], smooth),
                        moving_average([h[key] for h in base], smooth),
                    )
                )
                for key in ("loss", "grad_norm")
            }
            line += (
                f", max rel deviation from DP: loss {deviation['loss']:.2e}, "
                f"grad norm {deviation['grad_norm']:.2e}"
            )
        _progress(line)
    return histories


def _progress(line: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(line, flush=True)


def rel_diff(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b, strict=True)]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (bf16 curves agree as curves, not step by step)."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / min(window, i + 1)
            for i in range(len(values))]  # fmt: skip


def baseline_of(config: str) -> str:
    """What a configuration is compared with: data parallelism at the same tensor-parallel
    size (``TP<t>-U1R1-zigzag``; plain ``DP`` without TP), so that only USP differs. (TP
    itself reorders float32 reductions: 1.1e-6 in gradient norm on torch 2.11.)"""
    match = _CONFIG.match(config)
    tp = match.group(1) if match else None
    return "DP" if tp in (None, "1") else f"TP{tp}-U1R1-zigzag"


def compare(
    histories: dict[str, list[dict]], runs_of: dict[str, list[str]], smooth: int = 1
) -> dict:
    report = {}
    for model, configs in runs_of.items():
        for config in configs:
            baseline = baseline_of(config) if config != baseline_of(config) else "DP"
            base = histories[f"{model}/{baseline}"]
            run = histories[f"{model}/{config}"]
            entry = {"config": config, "model": model, "baseline": baseline}
            for key in ("loss", "grad_norm"):
                ours, theirs = [h[key] for h in run], [h[key] for h in base]
                entry[key] = ours
                entry[f"baseline_{key}"] = theirs
                entry[f"max_rel_{key}"] = max(
                    rel_diff(moving_average(ours, smooth), moving_average(theirs, smooth))
                )
            report[f"{model}/{config}"] = entry
    return report


def noise_bands(report: dict, noise_config: str | None) -> dict[str, dict[str, float]]:
    """Per model, how far a run that only reorders reductions strays from DP."""
    if noise_config is None:
        return {}
    return {
        entry["model"]: {"loss": entry["max_rel_loss"], "grad_norm": entry["max_rel_grad_norm"]}
        for entry in report.values()
        if entry["config"] == noise_config
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    baselines_drawn = set()
    for name, entry in report.items():
        steps = range(1, len(entry["loss"]) + 1)
        if entry["model"] not in baselines_drawn:
            baselines_drawn.add(entry["model"])
            axes[0].plot(steps, entry["baseline_loss"], "k-", lw=3, alpha=0.3,
                         label=f"{entry['model']}/DP")  # fmt: skip
            axes[1].plot(steps, entry["baseline_grad_norm"], "k-", lw=3, alpha=0.3)
        axes[0].plot(steps, entry["loss"], lw=1, label=name)
        axes[1].plot(steps, entry["grad_norm"], lw=1)
        axes[2].semilogy(steps, [max(d, 1e-12) for d in rel_diff(entry["loss"],
                         entry["baseline_loss"])], lw=1)  # fmt: skip
    axes[0].set(title="loss", xlabel="iteration")
    axes[1].set(title="gradient norm", xlabel="iteration")
    axes[2].set(title="|loss - DP loss| / DP loss", xlabel="iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated of {list(MODELS)}"
    )
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument(
        "--smooth", type=int, default=1, help="compare trailing means over this many steps"
    )
    parser.add_argument(
        "--baseline-attention",
        choices=("megatron", "usp"),
        default="megatron",
        help="the DP run's core attention: Megatron's DotProductAttention (an independent "
        "reference) or USP's at context-parallel size 1 (same kernel, e.g. for bf16 GPUs)",
    )
    parser.add_argument(
        "--noise-config",
        default=None,
        help="a configuration without USP that only reorders reductions (e.g. TP2-U1R1-zigzag: "
        "tensor parallelism x DP): its deviation from DP is the noise band of this precision, "
        "and every USP configuration must stay within --noise-factor x that band (or --rtol)",
    )
    parser.add_argument("--noise-factor", type=float, default=2.0)
    parser.add_argument("--out", default="runs/loss_parity", help="writes OUT.json, OUT.png")
    parser.add_argument("driver_args", nargs="*", help="after --: flags for every run")
    opts = parser.parse_args()
    configs = [c for c in opts.configs.split(",") if c]
    if opts.noise_config is not None and opts.noise_config not in configs:
        configs.append(opts.noise_config)
    models = [m for m in opts.models.split(",") if m]
    for model in models:
        if model not in MODELS:
            raise ValueError(f"model {model!r} is not one of {list(MODELS)}")
    common = QUICK + ["--data-cache-path", "runs/data"] + opts.driver_args
    runs_of = {
        model: (
            [c for c in SHORT_MODELS[model].split(",") if c]
            if model in SHORT_MODELS and opts.configs == DEFAULT_CONFIGS
            else configs
        )
        for model in models
    }
    runs = []
    for model, model_configs in runs_of.items():
        baseline = "usp" if model in SHORT_MODELS else opts.baseline_attention
        baselines = {baseline_of(config) for config in model_configs} - {"DP", *model_configs}
        for config in ["DP", *sorted(baselines), *model_configs]:
            flags = common + MODELS[model] + config_flags(config, baseline)
            runs.append((f"{model}/{config}", flags))
    for name, argv in runs:  # bad flags fail here, before any process starts
        try:
            check_configuration(parse_args(argv), opts.world_size)
        except ConfigError as error:
            print(f"loss_parity.py: run {name}: {error}", file=sys.stderr)
            return 1
    cuda = use_cuda(parse_args(common))
    print(f"{len(runs)} runs on {opts.world_size} {'GPUs' if cuda else 'CPU processes'}")
    histories = run_distributed(
        opts.world_size,
        run_world,
        runs,
        opts.smooth,
        backend="nccl" if cuda else "gloo",
        timeout_s=3600,
    )[0]
    report = compare(histories, runs_of, opts.smooth)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    bands = noise_bands(report, opts.noise_config)
    print(f"{'run':<28} {'max rel loss':>14} {'max rel grad norm':>18}")
    for name, entry in report.items():
        model, config = name.split("/")
        tol_loss, tol_grad = opts.rtol, opts.rtol
        if model in bands:
            tol_loss = max(opts.rtol, opts.noise_factor * bands[model]["loss"])
            tol_grad = max(opts.rtol, opts.noise_factor * bands[model]["grad_norm"])
        entry["tolerance"] = {"loss": tol_loss, "grad_norm": tol_grad}
        ok = entry["max_rel_loss"] <= tol_loss and entry["max_rel_grad_norm"] <= tol_grad
        if config == opts.noise_config:
            ok = True  # it defines the band
        entry["ok"] = ok
        if not ok:
            failed.append(name)
        print(f"{name:<28} {entry['max_rel_loss']:>14.2e} {entry['max_rel_grad_norm']:>18.2e}"
              f"  {'ok' if ok else 'MISMATCH'}")  # fmt: skip
    for model, band in bands.items():
        print(
            f"{model}: noise band ({opts.noise_config} vs DP) loss {band['loss']:.2e}, grad "
            f"norm {band['grad_norm']:.2e}; USP allowed {opts.noise_factor:g} x that"
        )
    summary = {"rtol": opts.rtol, "smooth": opts.smooth, "world_size": opts.world_size,
               "common_args": common, "baseline_attention": opts.baseline_attention,
               "noise_config": opts.noise_config, "noise_factor": opts.noise_factor,
               "noise_bands": bands, "runs": report}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    if failed:
        print(f"loss parity FAILED (rtol {opts.rtol}): {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"loss parity ok: {len(report)} runs within rtol {opts.rtol} of data parallelism")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
