"""The integer and window checks every layer shares: one message for each mistake.

The lowest layer: it imports nothing of the package.
"""

from __future__ import annotations

import warnings

Window = tuple[int, int]


def check_positive_int(name: str, value: object, meaning_of_one: str = "") -> None:
    """Refuse anything but an integer >= 1 (a bool is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        one = f" (1: {meaning_of_one})" if meaning_of_one else ""
        raise ValueError(f"{name} must be an integer >= 1{one}, got {value!r}")


def check_degrees(ulysses_degree: object, ring_degree: object) -> None:
    """Both USP degrees are integers >= 1."""
    check_positive_int("ulysses_degree", ulysses_degree, "no all-to-all")
    check_positive_int("ring_degree", ring_degree, "no ring")


def check_window(window_size: object) -> Window | None:
    """``window_size=(left, right)``: query ``i`` sees keys ``i-left .. i+right``, -1 unbounded.
    Returns None for full attention (None or ``(-1, -1)``)."""
    if window_size is None:
        return None
    ok = (
        isinstance(window_size, (tuple, list))
        and len(window_size) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    )
    if not ok:
        raise ValueError(
            f"window_size must be (left, right) with integers >= -1 (-1: unbounded; Megatron's "
            f"--window-size), got {window_size!r}"
        )
    left, right = window_size
    return None if (left, right) == (-1, -1) else (left, right)


_RENAMES_SAID: set[tuple[str, str]] = set()


def renamed_keyword(where: str, old: str, new: str, old_value: object, new_value: object,
                    new_default: object) -> object:  # fmt: skip
    """The value of keyword ``new`` when a caller may still pass its old name ``old``:
    says once per process (a FutureWarning) that ``old`` is now ``new``, and refuses the
    two disagreeing."""
    if old_value is None:
        return new_value
    if (where, old) not in _RENAMES_SAID:
        _RENAMES_SAID.add((where, old))
        warnings.warn(
            f"{where}: {old}= is now {new}= (same values); {old}= will be removed",
            FutureWarning,
            stacklevel=3,
        )
    if new_value not in (new_default, old_value):
        raise ValueError(
            f"{where}: {new}={new_value!r} and {old}={old_value!r} disagree: pass {new}= only"
        )
    return old_value
