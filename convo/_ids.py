"""Conversation ids: short, safe to show users, and sortable by creation time.

An id is ``conv_`` followed by a ULID (48-bit millisecond timestamp and 80
random bits, Crockford base32). Ids made in one process are strictly
increasing, even within one millisecond, so "newest first" is "largest id
first" and an id doubles as a pagination cursor.
"""

from __future__ import annotations

import os
import re
import threading
import time

PREFIX = "conv_"
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_RE = re.compile(r"^conv_[0-9A-HJKMNP-TV-Z]{26}$")

_lock = threading.Lock()
_last = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_conversation_id() -> str:
    """Return a new id, greater than every id this process made before."""
    global _last
    with _lock:
        candidate = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
        # Same millisecond (or a clock step back): keep increasing monotonically.
        _last = max(candidate, _last + 1)
        return PREFIX + _encode(_last, 26)


def is_conversation_id(value: object) -> bool:
    """True if ``value`` has the shape of a conversation id."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


_BODY_PREFIX_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{1,26}$")


def is_id_prefix(body: str) -> bool:
    """True if ``body`` (an id without ``conv_``) could start an id, in any case."""
    return _BODY_PREFIX_RE.match(body.upper()) is not None
