"""Argument checks shared by the library's entry points: counts, sizes and numbers named in the error.

Each check raises :class:`loramix.config.ConfigError` (a ``ValueError``) whose message starts with the
option's name, so a bad ``limit=0`` fails before any model is loaded instead of giving wrong figures.
"""

from __future__ import annotations

import math
from typing import Any

from .config import ConfigError


def is_int(value: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = 1, *, optional: bool = False) -> None:
    """``value`` must be an int >= ``minimum`` (any int when ``minimum`` is None); None passes if ``optional``."""
    if value is None and optional:
        return
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        extra = " or None" if optional else ""
        raise ConfigError(f"{name}: must be an int{bound}{extra}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """``value`` must be a finite int or float within the bounds (open or closed); None passes if ``optional``."""
    if value is None and optional:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            bound = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bound = f" {'>' if low_open else '>='} {low}"
        elif high is not None:
            bound = f" {'<' if high_open else '<='} {high}"
        else:
            bound = ""
        raise ConfigError(f"{name}: must be a number{bound}{' or None' if optional else ''}, got {value!r}")
