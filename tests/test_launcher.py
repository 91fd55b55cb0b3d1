"""The launcher (``python -m usp_megatron.megatron.launch``): bad usage refused in one line
from rank 0, the other ranks exiting 1 quietly, with what is missing named (one process)."""

from __future__ import annotations

import signal

import pytest


def _refused(capsys, *argv: str) -> str:
    from usp_megatron.megatron import launch

    with pytest.raises(SystemExit) as exited:
        launch.main(list(argv))
    assert exited.value.code == 1
    return capsys.readouterr().err


def test_launcher_refuses_bad_usage_and_names_what_is_missing(tmp_path, capsys, monkeypatch):
    from usp_megatron.megatron import launch

    monkeypatch.setenv("RANK", "0")
    assert _refused(capsys, "--usp-ring-degree", "2").startswith("usage: python -m usp_megatron")
    missing = tmp_path / "pretrain_gpt.py"
    assert _refused(capsys, str(missing)) == (
        f"usp_megatron.megatron.launch: no such script: {missing}\n"
    )
    monkeypatch.setenv("RANK", "3")  # the others say nothing, exit 1 too
    monkeypatch.setattr(launch, "exit_refused", _no_grace(launch.exit_refused))
    assert _refused(capsys, str(missing)) == ""
    missing.write_text("raise SystemExit('ran')\n")
    try:
        import megatron.training  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Megatron-LM"):
            launch.main([str(missing)])


def _no_grace(exit_refused):
    return lambda message, grace_s=30.0, speaks=None: exit_refused(message, 0, speaks)


def test_exit_refused_leaves_the_sigterm_handler_as_it_was(monkeypatch):
    """A rank that waits for the speaking one handles SIGTERM as exit 1, only meanwhile: a
    caller that catches the SystemExit (here pytest) keeps its own handler."""
    from usp_megatron.megatron.validation import exit_refused

    monkeypatch.setenv("RANK", "1")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        exit_refused("refused", grace_s=0)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_waiting_rank_exits_1_on_sigterm(monkeypatch):
    """torchrun ends the other ranks with SIGTERM once the speaking one has exited: they
    exit 1 (not killed by the signal), and the handler is put back."""
    import os

    from usp_megatron.megatron.validation import exit_refused

    monkeypatch.setenv("RANK", "2")
    before = signal.getsignal(signal.SIGTERM)
    previous_alarm = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(SystemExit) as exited:
            exit_refused("refused", grace_s=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
    assert exited.value.code == 1
    assert signal.getsignal(signal.SIGTERM) is before


SCRIPT = """
import functools, sys
from usp_megatron.megatron import megatron_lm
sys.excepthook = megatron_lm.wrap_excepthook(sys.excepthook)
megatron_lm.exit_refused = functools.partial(megatron_lm.exit_refused, grace_s=0)
raise {error}
"""


def test_excepthook_says_a_refusal_once_and_leaves_other_errors_alone(tmp_path):
    """What ``install()`` does for the patched script: a refusal escaping it is one line from
    rank 0 and exit 1 on every rank; any other error is Python's own traceback."""
    import os
    import subprocess
    import sys

    runs = {
        ("USPArgumentError('--seq-length 100: use 96')", "0"): None,
        ("USPArgumentError('--seq-length 100: use 96')", "1"): None,
        ("ValueError('not the plugin')", "0"): None,
    }
    for error, rank in runs:
        script = tmp_path / f"rank{rank}_{len(error)}.py"
        script.write_text(SCRIPT.format(error="megatron_lm." + error if "USP" in error else error))
        env = dict(os.environ, RANK=rank, PYTHONWARNINGS="ignore")
        runs[error, rank] = subprocess.Popen(
            [sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True
        )
    done = {key: (proc.wait(timeout=300), proc.stderr.read()) for key, proc in runs.items()}
    refusal = "USPArgumentError('--seq-length 100: use 96')"
    assert done[refusal, "0"] == (1, "usp_megatron: --seq-length 100: use 96\n")
    assert done[refusal, "1"] == (1, "")
    code, err = done["ValueError('not the plugin')", "0"]
    assert code == 1 and "Traceback" in err and err.endswith("ValueError: not the plugin\n")
