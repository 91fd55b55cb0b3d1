#!/usr/bin/env python3
"""How well ``choose_degrees`` ranks measured ``U x R``: its cost model against benchmark JSON.

    python benchmarks/check_degrees.py [BENCH_JSON ...] [--fit] [--out FILE]

Reads ``bench_attention.py`` results (default: the 4 x H100 MHA and GQA runs in
``docs/results/``), keeps ours at forward + backward, zigzag, cuDNN (what training runs),
and for each sequence length and head layout prints the measured and modelled time of
every ``U x R``, the configuration ``choose_degrees`` picks, and its measured time against
the best measured. ``--fit`` first refits the cost model's constants to these points
(least squares of relative error; needs scipy) and reports how a fit on MHA alone
predicts GQA. The table comes last; ``--out`` writes it as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from usp_megatron.degrees import CostModel, degree_costs, pick  # noqa: E402

DEFAULT_RUNS = [ROOT / f"docs/results/{run}/bench.json" for run in ("h100x4", "h100x4_gqa")]
FITTED = ("kernel_flops", "all_to_all_bytes_per_s", "ring_bytes_per_s", "ring_contention",
          "ring_step_s")  # fmt: skip


def measured_points(paths: list[Path]) -> dict[tuple, dict[tuple[int, int], float]]:
    """``{(gpus, seq_len, heads, kv_heads): {(U, R): ms}}`` of ours, fwd+bwd, zigzag, cuDNN."""
    groups: dict[tuple, dict[tuple[int, int], float]] = defaultdict(dict)
    for path in paths:
        for rec in json.loads(Path(path).read_text())["records"]:
            if (rec["family"], rec["mode"], rec["impl"], rec["kernel"], rec["status"]) != (
                "usp",
                "fwdbwd",
                "zigzag",
                "cudnn",
                "ok",
            ):
                continue
            key = (rec["gpus"], rec["seq_len"], rec["heads"], rec["kv_heads"])
            groups[key][(rec["ulysses"], rec["ring"])] = rec["ms"]
    return dict(groups)


def modelled_ms(key: tuple, model: CostModel) -> dict[tuple[int, int], float]:
    gpus, seq_len, heads, kv_heads = key
    costs = degree_costs(gpus, heads, kv_heads, gpus, seq_len, model)
    return {(c.ulysses, c.ring): c.total_s * 1e3 for c in costs}


def relative_errors(groups: dict, model: CostModel) -> list[float]:
    errors = []
    for key, measured in groups.items():
        modelled = modelled_ms(key, model)
        errors += [modelled[ur] / ms - 1 for ur, ms in measured.items()]
    return errors


def fit(groups: dict, start: CostModel) -> CostModel:
    try:
        from scipy.optimize import least_squares
    except ImportError as error:
        raise SystemExit(f"--fit needs scipy (pip install scipy): {error}") from error

    def model_of(logs) -> CostModel:
        return dataclasses.replace(start, **{n: math.exp(x) for n, x in zip(FITTED, logs)})

    x0 = [math.log(getattr(start, name)) for name in FITTED]
    result = least_squares(lambda x: relative_errors(groups, model_of(x)), x0)
    return model_of(result.x)


def ranked(times: dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    return sorted(times, key=times.get)


def chosen_and_best(key: tuple, measured: dict, model: CostModel) -> tuple[tuple, tuple]:
    gpus, seq_len, heads, kv_heads = key
    chosen = pick(degree_costs(gpus, heads, kv_heads, gpus, seq_len, model), model)
    return (chosen.ulysses, chosen.ring), ranked(measured)[0]


def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--fit", action="store_true", help="refit the constants first")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON")
    args = parser.parse_args(argv)
    groups = measured_points(args.runs)
    if not groups:
        raise SystemExit(f"no fwd+bwd zigzag cuDNN USP records in {[str(p) for p in args.runs]}")
    model = CostModel()
    if args.fit:
        model = fit(groups, model)
        print("fitted:", {name: f"{getattr(model, name):.4g}" for name in FITTED})
        mha = {k: v for k, v in groups.items() if k[2] == k[3]}
        gqa = {k: v for k, v in groups.items() if k[2] != k[3]}
        if mha and gqa:
            mha_model = fit(mha, model)
            held_out = relative_errors(gqa, mha_model)
            agree = sum(chosen_and_best(key, gqa[key], mha_model)[0] == ranked(gqa[key])[0]
                        for key in gqa)  # fmt: skip
            print(f"fitted on MHA alone, on GQA: time error rms {rms(held_out):.1%}; picks the "
                  f"measured best in {agree} of {len(gqa)} cases")  # fmt: skip
    errors = relative_errors(groups, model)
    print(f"modelled vs measured time, {len(errors)} points: rms {rms(errors):.1%}, "
          f"worst {max(map(abs, errors)):.1%}")  # fmt: skip

    rows = []
    for key in sorted(groups):
        gpus, seq_len, heads, kv_heads = key
        measured, modelled = groups[key], modelled_ms(key, model)
        chosen_ur, best_ur = chosen_and_best(key, measured, model)
        order = {ur: modelled[ur] for ur in measured}
        rows.append(dict(
            gpus=gpus, seq_len=seq_len, heads=heads, kv_heads=kv_heads,
            measured_ms={f"U{u}R{r}": round(ms, 2) for (u, r), ms in sorted(measured.items())},
            modelled_ms={f"U{u}R{r}": round(modelled[u, r], 2) for u, r in sorted(measured)},
            chosen=f"U{chosen_ur[0]}R{chosen_ur[1]}", best=f"U{best_ur[0]}R{best_ur[1]}",
            chosen_vs_best=round(measured[chosen_ur] / measured[best_ur], 3),
            measured_order=" < ".join(f"U{u}R{r}" for u, r in ranked(measured)),
            modelled_order=" < ".join(f"U{u}R{r}" for u, r in ranked(order)),
        ))  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(dict(model=dataclasses.asdict(model), rows=rows), indent=1))
    configs = sorted({c for row in rows for c in row["measured_ms"]})
    header = [
        "GPUs",
        "tokens",
        "heads q/kv",
        *(f"{c} ms measured / model" for c in configs),
        "chosen",
        "best measured",
        "chosen / best",
        "order measured",
        "order modelled",
    ]
    print("| " + " | ".join(header) + " |")  # fmt: skip
    print("| --- " * len(header) + "|")
    for row in rows:
        cells = [
            f"{row['measured_ms'][c]:.2f} / {row['modelled_ms'][c]:.2f}" if c in row["measured_ms"]
            else "-"
            for c in configs
        ]  # fmt: skip
        print(f"| {row['gpus']} | {row['seq_len'] // 1024}K | {row['heads']}/{row['kv_heads']} | "
              + " | ".join(cells)
              + f" | {row['chosen']} | {row['best']} | {row['chosen_vs_best']:.3f} | "
              f"{row['measured_order']} | {row['modelled_order']} |")  # fmt: skip


if __name__ == "__main__":
    main()
