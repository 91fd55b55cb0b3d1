"""The one parser of the benchmark's sizes: sequence lengths, U x R factorisations, heads.

Shared by ``bench_attention.py`` and ``profile_attention.py``; it imports nothing beyond the
standard library, so ``tests/test_bench_configs.py`` loads it from its file. Every error is
a ``ValueError`` that names the flag and the value, raised before any process group exists.
"""

from __future__ import annotations

from collections.abc import Iterable

MODES = ("fwd", "fwdbwd")
GQA_RATIO = 4  # --gqa on: 32 query heads share 8 key/value heads
_SUFFIXES = {"k": 2**10, "m": 2**20}


def csv(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_seq_len(text: str, flag: str = "--seqlens") -> int:
    """``"32768"``, ``"32K"`` or ``"32k"`` -> 32768 (K = 1024, M = 1024 K)."""
    value = text.strip()
    scale = _SUFFIXES.get(value[-1:].lower(), 1)
    digits = value[:-1] if scale > 1 else value
    if not digits.isdigit() or int(digits) == 0:
        raise ValueError(f"{flag} entry {text!r} is not a positive token count, e.g. 32768 or 32K")
    return int(digits) * scale


def parse_seq_lens(text: str, flag: str = "--seqlens") -> list[int]:
    """``"32K,64K,131072"`` -> [32768, 65536, 131072]."""
    lengths = [parse_seq_len(item, flag) for item in csv(text)]
    if not lengths:
        raise ValueError(f"{flag} {text!r} names no sequence length, e.g. 32K,64K")
    return lengths


def factorizations(world_size: int) -> list[tuple[int, int]]:
    """Every ``(U, R)`` with ``U * R == world_size``, smallest ``U`` first."""
    return [(u, world_size // u) for u in range(1, world_size + 1) if world_size % u == 0]


def parse_configs(
    text: str | None, world_size: int, flag: str = "--configs"
) -> list[tuple[int, int]]:
    """``"2x2,4x1"`` -> [(2, 2), (4, 1)] (U x R); ``None``: every factorisation."""
    if text is None:
        return factorizations(world_size)
    configs = []
    for item in csv(text):
        try:
            u, r = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"{flag} entry {item!r} is not UxR, e.g. 2x2") from None
        if u < 1 or r < 1:
            raise ValueError(f"{flag} entry {item!r}: U and R must be positive")
        if u * r != world_size:
            raise ValueError(f"{flag} entry {item!r}: {u} * {r} != world size {world_size}")
        configs.append((u, r))
    if not configs:
        raise ValueError(
            f"{flag} {text!r} names no UxR entry; leave it out for every "
            f"factorisation of {world_size}"
        )
    return configs


def kv_head_counts(heads: int, gqa: str) -> list[int]:
    """Key/value head counts to run: ``off`` MHA, ``on`` heads / GQA_RATIO, ``both``."""
    if heads < 1:
        raise ValueError(f"--heads must be positive, got {heads}")
    if gqa != "off" and heads % GQA_RATIO:
        raise ValueError(f"--gqa needs --heads divisible by {GQA_RATIO}, got {heads}")
    choices = {"off": [heads], "on": [heads // GQA_RATIO], "both": [heads, heads // GQA_RATIO]}
    if gqa not in choices:
        raise ValueError(f"--gqa {gqa!r} is not one of {list(choices)}")
    return choices[gqa]


def check_choices(flag: str, values: Iterable[str], allowed: Iterable[str]) -> None:
    """ValueError naming the values of ``flag`` that are not in ``allowed``."""
    allowed = list(allowed)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{flag}: {bad} not in {allowed}")
