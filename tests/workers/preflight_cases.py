"""Run in a gloo world by test_pretrain_preflight.py: the GPT driver's ``train`` on
configurations it must refuse before building anything."""

from __future__ import annotations

from helpers.example import example_on_path


def refusals_in_train(argvs: list[list[str]]) -> list[str | None]:
    """The ConfigError message of each ``train(parse_args(argv))``, None if it trained."""
    example_on_path()
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
