"""The GPT pretraining example end to end on CPU processes: loss parity against data
parallelism (the README's command), and resuming from a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.example import EXAMPLE, run_quiet


def _run(cmd: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    done = run_quiet(cmd, cwd, timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_loss_parity_default_command(tmp_path):
    out = tmp_path / "parity"
    done = _run([sys.executable, str(EXAMPLE / "loss_parity.py"), "--out", str(out)], tmp_path)
    assert "loss parity ok" in done.stdout
    assert "[ 1/32] mha/DP: started" in done.stdout  # progress while it runs
    assert "[32/32] packed/U4R1-zigzag: done in" in done.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    runs = report["runs"]
    assert report["rtol"] == 1e-6 and len(runs) == 14 + 3 + 1 + 3 + 1 + 1
    for name, run in runs.items():
        assert len(run["loss"]) == 6 and run["ok"], name
        assert run["baseline"] == ("TP2-U1R1-zigzag" if "TP2-" in name else "DP"), name
        assert max(run["max_rel_loss"], run["max_rel_grad_norm"]) <= 1e-6, name
        assert run["loss"][-1] < run["loss"][0] - 0.5, f"{name} did not train"
    assert out.with_suffix(".png").stat().st_size > 10_000
    # Negative control: a sliding window that were ignored (the same model and data with
    # full attention) would be off by far more than the tolerance (6e-4 against 1e-6).
    full = runs["mha/U4R1-zigzag"]["baseline_loss"]
    for windowed in ("swa/U4R1-zigzag", "swa-alt/U2R2-zigzag"):
        ignored = max(abs(a - b) / b for a, b in zip(full, runs[windowed]["baseline_loss"]))
        assert ignored > 100 * report["rtol"], f"{windowed}: window ignored unnoticed ({ignored})"
    # Megatron-LM's three document flags are --pack-documents, run for run.
    docs, packed = runs["megatron-docs/U2R2-zigzag"], runs["packed/U2R2-zigzag"]
    assert (docs["loss"], docs["baseline_loss"]) == (packed["loss"], packed["baseline_loss"])
    # The same for packed documents that were allowed to see each other.
    unmasked = runs["packed-nomask/U2R2-zigzag"]["baseline_loss"]
    for packed in ("packed/U4R1-zigzag", "packed/U2R2-zigzag", "packed/U1R4-zigzag"):
        seen = max(abs(a - b) / b for a, b in zip(unmasked, runs[packed]["baseline_loss"]))
        assert seen > 100 * report["rtol"], f"{packed}: documents mixed unnoticed ({seen})"


def _pretrain(tmp_path: Path, history: str, *flags: str) -> list[dict]:
    common = ["--usp-ulysses-degree", "2", "--global-batch-size", "4", "--seq-length", "64",
              "--lr-warmup-iters", "1", "--lr-decay-iters", "4",
              "--data-cache-path", str(tmp_path / "data")]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(EXAMPLE / "pretrain_gpt.py")]  # fmt: skip
    _run([*torchrun, *common, "--history-json", str(tmp_path / history), *flags], tmp_path)
    return json.loads((tmp_path / history).read_text())["history"]


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    straight = _pretrain(tmp_path, "straight.json", "--train-iters", "4")
    ckpt = str(tmp_path / "ckpt")
    first = _pretrain(tmp_path, "first.json", "--train-iters", "2", "--save", ckpt)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "2"
    resumed = _pretrain(tmp_path, "resumed.json", "--train-iters", "4", "--load", ckpt)
    assert [h["iteration"] for h in resumed] == [3, 4]
    for mine, theirs in zip(first + resumed, straight, strict=True):
        assert mine["loss"] == theirs["loss"] and mine["grad_norm"] == theirs["grad_norm"]
