"""Run an unpatched Megatron-LM script with USP: ``python -m usp_megatron.megatron.launch``.

    torchrun --nproc-per-node 8 -m usp_megatron.megatron.launch pretrain_gpt.py \
        --usp-ulysses-degree 4 --usp-ring-degree 2 ...   # plus the script's usual flags

Installs the hooks (with the ``--usp-*`` flags added to Megatron-LM's parser), then runs
the script as ``__main__`` from its own directory, as ``python pretrain_gpt.py`` would.
Its own usage errors and the plugin's refusals (:class:`USPRefusal`) print once, by one
rank, as one line, and every rank exits 1; any other error propagates as it would without
the launcher.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from usp_megatron.megatron.megatron_lm import install
from usp_megatron.megatron.validation import USPRefusal, exit_refused

__all__ = ["exit_refused", "main"]

USAGE = (
    "usage: python -m usp_megatron.megatron.launch SCRIPT.py [script flags] "
    "[--usp-ulysses-degree U --usp-ring-degree R ...]"
)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        exit_refused(USAGE)
    script = Path(argv[0]).resolve()
    if not script.is_file():
        exit_refused(f"usp_megatron.megatron.launch: no such script: {script}")
    install(add_flags=True)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except USPRefusal as error:
        exit_refused(f"usp_megatron: {error}", speaks=error.speaks)


if __name__ == "__main__":
    main()
