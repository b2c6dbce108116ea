"""Argument checks shared by the data modules (errors name the argument and what it accepts)."""

from __future__ import annotations


def check_int(name: str, value: object, minimum: int = 1, *, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an ``int`` (not a ``bool``) ``>= minimum`` (or ``None`` when allowed).

    Raises:
        ValueError: ``"<name> must be a positive integer[ or None], got <value>"``
            (``"an integer >= <minimum>"`` when ``minimum != 1``).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if allow_none:
            expected += " or None"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_fraction(name: str, value: object, *, inclusive: bool) -> float:
    """Return ``value`` if it is a real number in [0, 1] (``inclusive``) or in (0, 1).

    Raises:
        ValueError: naming ``name`` and the accepted interval.
    """
    number_ok = not isinstance(value, bool) and isinstance(value, (int, float))
    in_range = number_ok and (0.0 <= value <= 1.0 if inclusive else 0.0 < value < 1.0)
    if not in_range:
        interval = "in [0, 1]" if inclusive else "strictly between 0 and 1"
        raise ValueError(f"{name} must be a number {interval}, got {value!r}")
    return float(value)
