"""benchmarks/bench_cudnn.py end to end on CPU (the plain-torch kernel standing in for every
GPU kernel, tiny sizes): the script, its rows, ratios, budget and JSON keep working between
GPU runs. Timings are not looked at."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--seqlens", "128,256", "--window", "16", "--packed-tokens", "256",
         "--random-docs", "20", "--equal-docs", "4", "--usp-tokens", "128", "--heads", "2",
         "--gqa-kv-heads", "1", "--head-dim", "8", "--iters", "1", "--usp-iters", "1",
         "--warmup", "1"]  # fmt: skip


def _run(tmp_path, *extra):
    command = [sys.executable, str(REPO / "benchmarks" / "bench_cudnn.py"), *SMALL,
               "--out", str(tmp_path), *extra]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads((tmp_path / "bench_cudnn.json").read_text())


def test_bench_cudnn_smoke_on_cpu(tmp_path):
    stdout, record = _run(tmp_path)
    rows = record["rows"]
    # 2 lengths x (2 dense + 3 window) + 2 head layouts x (1 + 2 packings x 2) + 3 USP x 2
    assert len(rows) == 2 * 5 + 2 * 5 + 6, [r["method"] for r in rows]
    assert all(r["ms"] is not None and not r["note"] for r in rows), rows
    ratios = [r for r in rows if r["baseline"]]
    assert ratios and all(r["ratio"] is not None for r in ratios)
    checked = [r for r in rows if r["err_out"] is not None]
    assert len(checked) == 2 + 4 and all(r["err_out"] < 1e-6 for r in checked)
    assert not record["skipped"]
    lines = stdout.splitlines()
    header = next(n for n, line in enumerate(lines) if "ratio = ms / the row named" in line)
    assert header == len(lines) - len(rows) - 2  # the table is printed last, one line a row


def test_bench_cudnn_stops_at_its_budget(tmp_path):
    stdout, record = _run(tmp_path, "--budget-s", "0")
    assert record["skipped"] and all(r["ms"] is None for r in record["rows"])
    assert "skipped (over --budget-s 0)" in stdout
