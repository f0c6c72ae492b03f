"""Argument validation shared by the science package.

Every message starts with the argument's name, shows the offending value and says what is
allowed, so that callers that build objects from a config can prefix the config section
(``system.``, ``flow.``) and hand the user a message naming the field.
"""

from __future__ import annotations

import math
import numbers


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` as ``int``; TypeError if it is not an integer, ValueError if < minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: {value!r} is not an integer; an integer is required")
    out = int(value)
    if minimum is not None and out < minimum:
        raise ValueError(f"{name}: {out!r} is not allowed; must be an integer >= {minimum}")
    return out


def check_float(
    name: str,
    value: object,
    *,
    positive: bool = False,
    nonnegative: bool = False,
) -> float:
    """Return ``value`` as a finite ``float``.

    TypeError if it is not a real number (bools are rejected), ValueError if it is not finite,
    or not > 0 (``positive``) / not >= 0 (``nonnegative``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: {value!r} is not a real number; a finite float is required")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name}: {out!r} is not allowed; must be a finite number")
    if positive and out <= 0.0:
        raise ValueError(f"{name}: {out!r} is not allowed; must be > 0")
    if nonnegative and out < 0.0:
        raise ValueError(f"{name}: {out!r} is not allowed; must be >= 0")
    return out
