"""Words and quantities for people: counted nouns and unambiguous ages.

Pure functions; the CLI and error messages use them so that "1 request" and
"2 requests" are spelled one way everywhere.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Final

from .errors import InvalidInput

__all__ = ["AGE_UNITS", "parse_age", "plural"]


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``count`` and ``noun``, the noun in its plural unless the count is 1: "1 turn", "3 turns"."""
    word = noun if count == 1 else (plural_form or noun + "s")
    return f"{count:,} {word}"


#: Every spelling of each unit ``parse_age`` accepts. A month is 30 days and a year
#: 365 days. A bare ``m`` is refused: it could mean minutes or months.
AGE_UNITS: Final[dict[str, tuple[str, ...]]] = {
    "seconds": ("s", "sec", "secs", "second", "seconds"),
    "minutes": ("min", "mins", "minute", "minutes"),
    "hours": ("h", "hr", "hrs", "hour", "hours"),
    "days": ("d", "day", "days"),
    "weeks": ("w", "wk", "wks", "week", "weeks"),
    "months": ("mo", "mos", "month", "months"),
    "years": ("y", "yr", "yrs", "year", "years"),
}
_DAYS_PER: Final = {"months": 30, "years": 365}
_UNIT_OF: Final = {spelling: unit for unit, names in AGE_UNITS.items() for spelling in names}
_AGE: Final = re.compile(r"^\s*(\d+)\s*([a-zA-Z]+)\s*$")


def parse_age(text: str) -> timedelta:
    """An age like ``90d``, ``6mo``, ``12h``, ``30min``, ``2w`` or ``1y`` as a timedelta.

    Raises :class:`InvalidInput` for anything else, ``6m`` included (minutes or months?).
    """
    match = _AGE.match(text)
    if match is None or int(match.group(1)) == 0:
        raise InvalidInput("age", f"{text!r} is not an age like 90d, 6mo, 12h, 30min, 2w or 1y")
    number, spelling = int(match.group(1)), match.group(2).lower()
    if spelling == "m":
        raise InvalidInput(
            "age", f"{text!r} is ambiguous: write {number}min for minutes or {number}mo for months"
        )
    unit = _UNIT_OF.get(spelling)
    if unit is None:
        raise InvalidInput(
            "age",
            f"{text!r} has an unknown unit {spelling!r}: use s, min, h, d, w, mo or y",
        )
    if unit in _DAYS_PER:
        return timedelta(days=number * _DAYS_PER[unit])
    return timedelta(**{unit: number})
