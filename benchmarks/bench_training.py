"""Training speed of the GPT example: dense causal, packed documents and sliding windows.

Runs ``examples/pretrain_gpt/pretrain_gpt.py`` once per configuration (torchrun, one
process per GPU), reads each run's ``--history-json`` and prints a table of steady-state
tokens/s and MFU (the first ``--skip`` iterations excluded) with the ratio to dense; the
table and every run's history go to ``--out`` as JSON. Run from the repository root on a
GPU machine:

    python benchmarks/bench_training.py --seq-lengths 16384 --out runs/train_speed

Configurations: ``dense``, ``packed`` (the example corpus: cut at its end-of-document
tokens), ``packed8`` (8 equal documents per sample), ``window4096`` (``--window-size
4096 0``). The model is the example's 1.3B GPT (24 layers, hidden 2048, 16/8 heads)
unless ``--num-layers`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS: dict[str, list[str]] = {
    "dense": [],
    "packed": ["--pack-documents"],
    "packed8": ["--pack-documents", "--pack-documents-per-sample", "8"],
    "window4096": ["--window-size", "4096", "0"],
    "window4096_flash": ["--window-size", "4096", "0", "--usp-attn-backend", "torch_flash"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--num-layers", type=int, default=24)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--skip", type=int, default=3, help="warm-up iterations not counted")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--out", default="runs/train_speed")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="example flags")
    return parser.parse_args(argv)


def run_one(args: argparse.Namespace, name: str, seq_len: int, out: Path) -> dict:
    history = out / f"{name}_{seq_len}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.gpus}", "examples/pretrain_gpt/pretrain_gpt.py",
        "--num-layers", str(args.num_layers), "--hidden-size", "2048",
        "--num-attention-heads", "16", "--num-query-groups", "8",
        "--seq-length", str(seq_len), "--micro-batch-size", "1",
        "--global-batch-size", str(args.gpus), "--bf16", "--train-iters", str(args.iters),
        "--lr-warmup-iters", "1", "--usp-ulysses-degree", str(args.gpus),
        "--history-json", str(history), "--count-host-syncs", *CONFIGS[name], *args.extra,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    (out / f"{name}_{seq_len}.log").write_text(done.stdout + done.stderr)
    row = {"config": name, "seq_len": seq_len, "rc": done.returncode}
    row["wall_s"] = round(time.perf_counter() - start, 1)
    if done.returncode != 0 or not history.exists():
        row["error"] = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return row
    records = json.loads(history.read_text())["history"]
    steady = records[args.skip :] or records
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
    row["s_per_it"] = statistics.median(r["seconds"] for r in steady)
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    row["mfu"] = statistics.median(mfu) if mfu else None
    documents = [r["documents_per_sample"] for r in steady if "documents_per_sample" in r]
    row["documents_per_sample"] = statistics.mean(documents) if documents else None
    syncs = [r["host_syncs"] for r in steady if "host_syncs" in r]
    row["host_syncs_per_it"] = statistics.median(syncs) if syncs else None
    row["host_sync_sites"] = steady[-1].get("host_sync_sites")
    row["peak_memory_gib"] = max(r["peak_memory_bytes"] or 0 for r in steady) / 2**30
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seq_len in args.seq_lengths:
        for name in args.configs:
            rows.append(run_one(args, name, seq_len, out))
            print(json.dumps(rows[-1]), flush=True)
    dense = {r["seq_len"]: r.get("tokens_per_s") for r in rows if r["config"] == "dense"}
    print(f"\n{'config':<11} {'seq':>6} {'docs':>6} {'tok/s':>9} {'MFU':>6} {'s/it':>7} "
          f"{'GiB':>6} {'vs dense':>8} {'syncs/it':>8}")  # fmt: skip
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"{r['config']:<11} {r['seq_len']:>6} failed (rc {r['rc']}): {r['error']}")
            continue
        base = dense.get(r["seq_len"])
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        docs = f"{r['documents_per_sample']:.0f}" if r["documents_per_sample"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        speed = f"{r['tokens_per_s']:>9,.0f} {mfu:>6} {r['s_per_it']:>7.3f}"
        print(f"{r['config']:<11} {r['seq_len']:>6} {docs:>6} {speed} "
              f"{r['peak_memory_gib']:>6.1f} {ratio:>8} {r['host_syncs_per_it']!s:>8}")  # fmt: skip
    (out / "train_speed.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
