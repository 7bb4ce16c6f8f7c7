"""Checks on values callers hand to convo: numbers, times and JSON documents.

Each check either returns the value as convo will use it or raises
:class:`~convo.errors.InvalidInput` naming the argument, before anything is
written. Bounds are where a value stops meaning anything (a budget larger than
any context window, a lease of a century) or where a database or the JSON
encoder would fail with a traceback instead of an answer.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from typing import Any, Final

from .errors import InvalidInput

#: Deepest nesting of lists and objects accepted in metadata and content: MariaDB's
#: JSON columns refuse deeper documents, and far deeper ones make encoders recurse out.
#: One limit on every backend, so what one database stores, every database stores.
MAX_NESTING: Final = 32
#: A count or limit beyond this is a mistake, and past 2**63 databases refuse it.
MAX_COUNT: Final = 1_000_000_000
#: The longest duration convo accepts (leases, retention ages): about 200 years.
MAX_DURATION: Final = timedelta(days=73_000)


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether lists and dicts in ``value`` nest more than ``limit`` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend(
            (child, depth + 1) for child in children if isinstance(child, dict | list | tuple)
        )
    return False


def json_copy(value: Any, field: str, *, error: type[InvalidInput] = InvalidInput) -> Any:
    """A deep copy of ``value`` through JSON; ``error`` naming ``field`` if it cannot be stored."""
    if too_deep(value):
        raise error(field, f"is nested more than {MAX_NESTING} levels deep")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise error(field, f"is not JSON-serialisable: {exc}") from None


def check_count(field: str, value: object, *, maximum: int = MAX_COUNT) -> int:
    """A positive whole number no larger than ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(field, f"must be a positive integer, not {value!r}")
    if value > maximum:
        raise InvalidInput(field, f"must be at most {maximum:,}, not {value:,}")
    return value


def check_seconds(field: str, value: object) -> float:
    """A positive, finite number of seconds within :data:`MAX_DURATION`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(field, f"must be a finite number of seconds, not {value!r}")
    if value <= 0:
        raise InvalidInput(field, f"must be a positive number of seconds, not {value!r}")
    if value > MAX_DURATION.total_seconds():
        raise InvalidInput(field, f"must be at most {MAX_DURATION.days:,} days, not {value!r} s")
    return float(value)


def check_duration(field: str, value: object) -> timedelta:
    """A positive :class:`~datetime.timedelta` within :data:`MAX_DURATION`."""
    if not isinstance(value, timedelta):
        raise InvalidInput(field, f"must be a timedelta, not {type(value).__name__}")
    check_seconds(field, value.total_seconds())
    return value


def check_time(field: str, value: object) -> datetime | None:
    """None, or a timezone-aware datetime (a naive one is ambiguous: which zone?)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(field, f"must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(
            field, "must be timezone-aware, e.g. datetime.now(UTC) - timedelta(days=7)"
        )
    return value
