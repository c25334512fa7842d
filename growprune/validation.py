"""Argument checks shared by every constructor: one clear ``ValueError`` naming the argument.

Bad input must fail before anything changes, with a message that names the argument, says what
is allowed and shows what was given (``bool`` is refused where a number is expected, although
Python counts it as an ``int``: ``True`` as a learning rate is a typo, not a value).
"""

from __future__ import annotations

import math
from typing import Any


def check_integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an ``int``; raise unless it is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
) -> float:
    """``value`` as a ``float``; raise unless it is a finite number within the bounds.

    ``strict_minimum`` / ``strict_maximum`` exclude the bound itself.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = minimum is not None and (value < minimum or (strict_minimum and value == minimum))
    too_high = maximum is not None and (value > maximum or (strict_maximum and value == maximum))
    if too_low or too_high:
        if minimum is not None and maximum is not None:
            interval = f"{'(' if strict_minimum else '['}{minimum:g}, {maximum:g}{')' if strict_maximum else ']'}"
            raise ValueError(f"{name} must lie in {interval}, got {value!r}")
        if too_low:
            raise ValueError(f"{name} must be {'>' if strict_minimum else '>='} {minimum:g}, got {value!r}")
        raise ValueError(f"{name} must be {'<' if strict_maximum else '<='} {maximum:g}, got {value!r}")
    return float(value)
