"""Byte sizes on the command line: `65536`, `64KiB`, `64MiB`, `1GiB`, `2TiB`, `1PiB`, both
ways.

Only binary units are accepted. `64MB` is refused rather than guessed, because a
volume size that is off by 5 % is worse than an error.
"""

from __future__ import annotations

import re

from volkin.errors import InvalidArgument

UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
         "PIB": 1 << 50}
_SIZE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")
_DECIMAL = {"K", "KB", "M", "MB", "G", "GB", "T", "TB", "P", "PB"}


def parse_size(text: str, what: str = "size") -> int:
    """The number of bytes `text` names; raises InvalidArgument saying what is wrong."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise InvalidArgument(f"{what} {text!r} is not a size: use bytes or a number "
                              "with KiB, MiB, GiB, TiB or PiB, e.g. 64MiB")
    number, unit = int(match.group(1)), match.group(2).upper()
    if unit in _DECIMAL:
        raise InvalidArgument(f"{what} {text!r} is ambiguous: write {match.group(1)}"
                              f"{unit[0]}iB (binary) or the number of bytes")
    if unit not in UNITS:
        raise InvalidArgument(f"{what} {text!r} has an unknown unit {match.group(2)!r}: "
                              "use KiB, MiB, GiB, TiB or PiB")
    return number * UNITS[unit]


def parse_rate(text: str) -> int:
    """Bytes per second: a size, optionally followed by `/s` (`16MiB/s`)."""
    stripped = text.strip()
    if stripped.lower().endswith("/s"):
        stripped = stripped[:-2]
    return parse_size(stripped, "rate")


def format_size(n: int) -> str:
    """The largest binary unit that shows `n` exactly, else one decimal: 64MiB, 1.5GiB."""
    for unit, factor in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30),
                         ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            if n % factor == 0:
                return f"{n // factor}{unit}"
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"
