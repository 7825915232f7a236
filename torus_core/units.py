"""Human-readable byte sizes: ``512KiB``, ``1GiB``, ``2G`` (SI), ``4096``."""

from __future__ import annotations

import re
from fractions import Fraction

from torus_core.errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a size; SI suffixes (``G``, ``GB``) are powers of 10, ``GiB`` powers of 2.

    Raises :class:`InvalidArgument` for anything else, including negative numbers.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return text
    if not isinstance(text, str):
        raise InvalidArgument(f"size must be a string or integer, got {type(text).__name__}")
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"cannot parse size {text!r} (examples: 512KiB, 1GiB, 2G)")
    number, unit = m.groups()
    mult = _UNITS.get(unit.lower())
    if mult is None:
        raise InvalidArgument(f"unknown size unit {unit!r} in {text!r}")
    value = Fraction(number) * mult
    if value.denominator != 1:
        raise InvalidArgument(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Format bytes with binary units, e.g. ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
