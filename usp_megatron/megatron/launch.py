"""Run an unpatched Megatron-LM script with USP: ``python -m usp_megatron.megatron.launch``.

    torchrun --nproc-per-node 8 -m usp_megatron.megatron.launch pretrain_gpt.py \
        --usp-ulysses-degree 4 --usp-ring-degree 2 ...   # plus the script's usual flags

Installs the hooks (with the ``--usp-*`` flags added to Megatron-LM's parser), then runs
the script as ``__main__`` from its own directory, as ``python pretrain_gpt.py`` would.
The plugin's own refusals (:class:`USPArgumentError`) print once, on rank 0, as one line,
and exit 1; any other error propagates as it would without the launcher.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from usp_megatron.megatron.megatron_lm import USPArgumentError, install


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit(
            "usage: python -m usp_megatron.megatron.launch SCRIPT.py [script flags] "
            "[--usp-ulysses-degree U --usp-ring-degree R ...]"
        )
    script = Path(argv[0]).resolve()
    if not script.is_file():
        raise SystemExit(f"no such script: {script}")
    install(add_flags=True)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except USPArgumentError as error:
        exit_refused(f"usp_megatron: {error}")


def exit_refused(message: str, grace_s: float = 30.0) -> NoReturn:
    """Exit 1 on every rank with ``message`` printed once, by rank 0.

    Every rank refuses the same flags, so one line replaces a traceback per rank. The other
    ranks wait up to ``grace_s`` before exiting: torchrun ends all ranks as soon as one
    exits, which could otherwise kill rank 0 before it has printed (they exit 1 then too).
    """
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    time.sleep(grace_s)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
