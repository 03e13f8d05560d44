"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import math


class SpectralDiffusionError(Exception):
    """A bad input or a refused operation, explained in one line; never a bug."""


def check_number(value: object, what: str, *, low: float = -math.inf, high: float = math.inf) -> float:
    """`value` as a float, refused in one line unless it is a finite number in [low, high] (NaN and inf never are)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise SpectralDiffusionError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        if math.isfinite(low) and math.isfinite(high):
            bounds = f" between {low:g} and {high:g}"
        elif math.isfinite(low) or math.isfinite(high):
            bounds = f" of at least {low:g}" if math.isfinite(low) else f" of at most {high:g}"
        else:
            bounds = ""
        raise SpectralDiffusionError(f"{what} must be a finite number{bounds}, got {number:g}")
    return number
