"""The training benchmark (benchmarks/bench_training.py) on CPU: its flags, how a
``--longest`` series decides to skip a length, and two end-to-end runs on a tiny model
(a table, and the longest sweep with both series) that keep the script working between
GPU runs. Timings are not looked at."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers.example import run_quiet

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_training.py"
TINY = ["--extra", "--device", "cpu", "--hidden-size", "64", "--num-attention-heads", "8",
        "--num-query-groups", "4"]  # fmt: skip


def _load():
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_flags_and_their_refusals(capsys):
    table = bench.parse_args([])
    assert (table.iters, table.skip, table.name) == (6, 2, "train_speed")
    assert table.configs == ["dense", "packed", "packed8", "window4096", "megatron_grad_norm"]
    both = bench.parse_args(["--seq-lengths", "16384", "65536", "--num-layers", "24", "8"])
    assert [bench.layers_at(both, s) for s in (16384, 65536)] == [24, 8]
    longest = bench.parse_args(["--longest"])
    assert (longest.iters, longest.skip, longest.name) == (3, 1, "train_longest")
    argv = bench.example_argv(longest, "window4096", 65536)
    assert argv[argv.index("--recompute-granularity") :][:6] == bench.RECOMPUTE_FULL
    assert "--device-initialization" in argv and "--count-host-syncs" not in argv
    argv = bench.example_argv(bench.parse_args(["--cpu-initialization"]), "dense", 4096)
    assert "--device-initialization" not in argv and "--count-host-syncs" in argv
    for flags, message in [
        (["--longest", "--gpus", "2"], "--longest measures one GPU"),
        (["--iters", "1", "--skip", "0"], "--iters 1 must be at least 2"),
        (["--seq-lengths", "16384", "--num-layers", "24", "8"], "--num-layers 24 8: give one"),
        (["--longest", "--num-layers", "24", "8"], "(a table) one per --seq-lengths entry"),
        (["--longest", "--start-seq-length", "65536", "--max-seq-length", "32768"],
         "at most --max-seq-length 32768"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            bench.parse_args(flags)
        assert message in capsys.readouterr().err


def test_longest_series_skips_what_its_budget_cannot_pay():
    # Dense: attention dominates at long lengths, so doubling costs about 4x; a window
    # keeps each query's keys fixed, so about 2x.
    dense = bench.iteration_flops(262144, None, 24) / bench.iteration_flops(131072, None, 24)
    window = bench.iteration_flops(262144, 4096, 24) / bench.iteration_flops(131072, 4096, 24)
    assert 3.5 < dense < 4.0 and 2.0 < window < 2.2
    assert bench.iteration_flops(2048, 4096, 24) == bench.iteration_flops(2048, None, 24)
    # 3 iterations of 10 s (the first 12 s) and 5 s around them at 64K: 128K dense needs
    # 1.1 x (5 + 2 + 3 x 10 x 3.9) s, about 136 s.
    previous = {"seq_len": 65536, "num_layers": 24, "wall_s": 37.0,
                "history": [{"seconds": 12.0}, {"seconds": 10.0}, {"seconds": 10.0}]}  # fmt: skip
    spec = {"iters": 3, "window": None}
    estimate = bench._estimate_s(previous, 131072, 3, None)
    assert 120 < estimate < 140
    assert bench.skip_reason(previous, 131072, spec, estimate + 1) is None
    reason = bench.skip_reason(previous, 131072, spec, 100.0)
    assert reason == f"estimated {estimate:.0f} s, 100 s of the budget left for this series"
    assert bench.skip_reason(None, 32768, spec, 1.0) is None  # the first length is tried
    assert bench.skip_reason(None, 32768, spec, -3.0) == "no budget left for this series"


def test_out_of_memory_is_told_from_other_failures():
    import torch

    assert bench._failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))[1]
    assert bench._failure(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))[1]
    text, oom = bench._failure(RuntimeError("shape mismatch\nsecond line"))
    assert (text, oom) == ("RuntimeError: shape mismatch", False)


def _bench(tmp_path: Path, *flags: str) -> tuple[dict, list[str]]:
    out = tmp_path / "out"
    done = run_quiet([sys.executable, str(BENCH), "--out", str(out), *flags, *TINY],
                     tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    name = "train_longest" if "--longest" in flags else "train_speed"
    return json.loads((out / f"{name}.json").read_text()), sorted(p.name for p in out.iterdir())


def test_table_on_cpu(tmp_path):
    flags = ["--seq-lengths", "128", "--num-layers", "2", "--iters", "2", "--skip", "1",
             "--configs", "dense", "megatron_grad_norm"]  # fmt: skip
    bundle, files = _bench(tmp_path, *flags)
    assert files == ["train_speed.json", "train_speed.table.log"]
    rows = {r["config"]: r for r in bundle["rows"]}
    assert set(rows) == {"dense", "megatron_grad_norm"}
    assert all(r["tokens_per_s"] > 0 and r["iterations"] == 2 for r in rows.values())
    runs = bundle["workers"]["table"]["runs"]
    assert [len(r["history"]) for r in runs] == [2, 2] and bundle["workers"]["table"]["rc"] == 0
    log = "\n".join(bundle["workers"]["table"]["log_tail"])
    assert "grad norm  megatron-core's per-tensor fallback" in log
    assert "==== megatron_grad_norm at 128: done in" in log


def test_longest_on_cpu_both_series(tmp_path):
    bundle, files = _bench(tmp_path, "--longest", "--num-layers", "2", "--start-seq-length",
                           "128", "--max-seq-length", "256", "--iters", "2",
                           "--budget-s", "3000")  # fmt: skip
    assert files == ["train_longest.dense.log", "train_longest.json",
                     "train_longest.window4096.log"]  # fmt: skip
    trained = [(r["config"], r["seq_len"]) for r in bundle["rows"] if "tokens_per_s" in r]
    assert trained == [("window4096", 128), ("window4096", 256), ("dense", 128), ("dense", 256)]
    assert bundle["summary"][0].startswith("window4096: longest 256 tokens (")
    log = "\n".join(bundle["workers"]["dense"]["log_tail"])
    assert "recompute  full, uniform: every layer runs again in the backward" in log
