"""Run in a gloo world by test_pretrain_preflight.py: the GPT driver's ``train`` on
configurations it must refuse before building anything."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "pretrain_gpt"


def refusals_in_train(argvs: list[list[str]]) -> list[str | None]:
    """The ConfigError message of each ``train(parse_args(argv))``, None if it trained."""
    sys.path.insert(0, str(EXAMPLE))
    from arguments import parse_args
    from preflight import ConfigError
    from training import train

    messages: list[str | None] = []
    for argv in argvs:
        try:
            train(parse_args(argv))
        except ConfigError as error:
            messages.append(str(error))
        else:
            messages.append(None)
    return messages
