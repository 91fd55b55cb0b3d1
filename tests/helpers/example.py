"""The GPT example driver (``examples/pretrain_gpt``), and running a script quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "pretrain_gpt"


def example_on_path() -> None:
    """Put the example on ``sys.path`` (once), so ``arguments``, ``preflight``, ``report`` and
    ``training`` import by name as the driver imports them."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))


def run_quiet(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """``cmd`` with warnings off and one thread per process, its output captured."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
