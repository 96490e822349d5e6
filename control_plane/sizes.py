"""Stored bytes as people write and read them, in decimal units (1 GB is 10^9 bytes): storage
is billed in them, and the `tinker` SDK's `size_gigabytes` counts in them. The operator's
command line and the dashboard's forms take a checkpoint cap as `500M`, `20G` or plain bytes
(`parse_size`); pages show sizes as `20 GB` (`human_size`)."""

from __future__ import annotations

import re
from decimal import Decimal

# Largest first: `exact_size` names a size by the largest unit that divides it.
UNITS = (("T", 10**12), ("G", 10**9), ("M", 10**6), ("K", 10**3))
_FACTORS = dict(UNITS)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """The bytes `text` writes: `20000000000`, `20G`, `20 GB`, `1.5T`, `500m` (K, M, G and T are
    decimal). ValueError, saying what is taken, for anything else or a fraction of a byte."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: give bytes, or a number with K, M, G or T (decimal: 20G "
            "is 20,000,000,000 bytes)"
        )
    number = Decimal(match[1]) * _FACTORS.get(match[2].upper(), 1)
    if number != number.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(number)


def exact_size(size: int) -> str:
    """`size` as `parse_size` reads it back: in the largest unit that divides it (`20G`), else
    in bytes (`1234`). For a form's value, where `20 GB` rounded would change the cap."""
    for unit, factor in UNITS:
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def human_size(size: int) -> str:
    """`size` to read at a glance, in the largest unit it reaches: `20 GB`, `1.23 GB`, `512 B`."""
    for unit, factor in UNITS:
        if size >= factor:
            value = size / factor
            places = 2 if value < 10 else 1 if value < 100 else 0
            shown = f"{value:,.{places}f}"
            if places:
                shown = shown.rstrip("0").rstrip(".")
            return f"{shown} {unit}B"
    return f"{size} B"
