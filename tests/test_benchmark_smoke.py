"""The attention benchmark (and the profiler script) run end to end on CPU processes, and
the benchmark's USP rows are correct.

A smoke run (gloo, float32, the reference kernel, tiny shapes): it keeps the benchmark
script working between GPU runs. Timings are not looked at.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_on_cpu(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(REPO / "benchmarks" / "bench_attention.py"),
        "--device",
        "cpu",
        "--seqlens",
        "256",
        "--heads",
        "4",
        "--head-dim",
        "16",
        "--gqa",
        "both",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--peers",
        "none",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    ours = [r for r in records if r["family"] == "usp"]
    # 2 configs x 3 impls x 2 modes x 2 head layouts
    assert len(ours) == 24, [r["label"] for r in ours]
    for record in ours:
        assert record["status"] == "ok", record
        errors = [record["err_out"]]
        if record["mode"] == "fwdbwd":
            errors += [record["err_dq"], record["err_dk"], record["err_dv"]]
        assert max(errors) < 1e-5, record
    assert (tmp_path / "bench.png").stat().st_size > 0

    (tmp_path / "bench.png").unlink()
    replot = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_attention.py"),
        "--replot",
        str(tmp_path / "bench.json"),
    ]
    done = subprocess.run(replot, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUMMARY" in done.stdout and (tmp_path / "bench.png").stat().st_size > 0


def test_profile_script_smoke_on_cpu(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(REPO / "benchmarks" / "profile_attention.py"),
        "--device",
        "cpu",
        "--seq-len",
        "256",
        "--heads",
        "4",
        "--head-dim",
        "16",
        "--backends",
        "reference",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--parts",
        "kernel,copy,all_to_all,usp,profile",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "profile.json").read_text())
    parts = {row["part"] for row in rows}
    assert parts == {"kernel", "copy", "all_to_all", "usp", "profile"}, parts
    usp = [row for row in rows if row["part"] == "usp"]
    assert len(usp) == 2 * 2 and all(row["ms"] > 0 for row in usp), usp  # 2x1, 1x2; 1, 2 chunks
    assert sorted(p.name for p in tmp_path.glob("trace_*.json.gz")) == [
        "trace_U1R2.json.gz",
        "trace_U2R1.json.gz",
    ]
