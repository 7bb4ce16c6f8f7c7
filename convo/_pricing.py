"""What a request cost, in US dollars, from the ``usage`` the API reports.

Prices are per million tokens and kept per model, cache prices included: they
are never derived from the usual multipliers, because some models differ. A
price we do not know is ``None``, and a cost that would need it is ``None``
too: convo reports "unknown" rather than a guess.

    >>> table = PriceTable()
    >>> table.cost("claude-haiku-4-5", {"input_tokens": 1_000, "output_tokens": 200})
    Decimal('0.002')
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from convo.errors import InvalidInput

__all__ = ["DEFAULT_PRICES", "Price", "PriceTable"]

#: Prices are quoted per this many tokens.
TOKENS_PER_PRICE_UNIT: Final = 1_000_000

#: The fields of :class:`Price` that hold a price (as opposed to the threshold).
PRICE_FIELDS: Final = (
    "input",
    "output",
    "cache_write_5m",
    "cache_write_1h",
    "cache_read",
    "long_input",
    "long_output",
)

#: A dated snapshot id is its alias plus ``-YYYYMMDD``: ``claude-haiku-4-5-20251001``.
_SNAPSHOT_SUFFIX: Final = re.compile(r"-\d{8}$")


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices in USD per million tokens; ``None`` means unknown.

    ``long_context_threshold`` is the prompt size (input + cache writes + cache
    reads, in tokens) above which input and output are billed at
    ``long_input`` and ``long_output`` instead of ``input`` and ``output``.
    """

    input: Decimal | None = None
    output: Decimal | None = None
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None
    cache_read: Decimal | None = None
    long_context_threshold: int | None = None
    long_input: Decimal | None = None
    long_output: Decimal | None = None

    def __post_init__(self) -> None:
        for name in PRICE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Decimal):
                raise InvalidInput(
                    name, f"must be a Decimal or None, not {type(value).__name__} {value!r}"
                )
            if not value.is_finite() or value < 0:
                raise InvalidInput(name, f"must be a finite price of at least 0, not {value}")
        threshold = self.long_context_threshold
        if threshold is None:
            if self.long_input is not None or self.long_output is not None:
                raise InvalidInput(
                    "long_context_threshold", "must be set when long_input or long_output is"
                )
        elif isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
            raise InvalidInput(
                "long_context_threshold", f"must be a positive number of tokens, not {threshold!r}"
            )


# Source: the price table of /work/shared/anthropic-api-notes.md ("Models and
# prices"), itself from the Anthropic model pages as reported in late 2026;
# transcribed 2026-11-23. A "?" there is None here. Verify before relying on them.
_DEFAULT_PRICES: Final[dict[str, Price]] = {
    "claude-opus-5-5": Price(
        input=Decimal("4"),
        output=Decimal("20"),
        cache_write_5m=Decimal("5"),
        cache_write_1h=Decimal("8"),
        cache_read=Decimal("0.20"),
    ),
    "claude-sonnet-5-5": Price(
        input=Decimal("2"),
        output=Decimal("10"),
        cache_write_5m=Decimal("2.50"),
        cache_write_1h=Decimal("4"),
        # The table gives 0.10; one model page says 0.20. Override if it matters.
        cache_read=Decimal("0.10"),
    ),
    "claude-haiku-5-5": Price(
        input=Decimal("0.10"),
        output=Decimal("0.50"),
        cache_write_5m=Decimal("0.125"),
        cache_write_1h=None,
        cache_read=None,
        long_context_threshold=100_000,
        long_input=Decimal("0.50"),
        long_output=Decimal("2.50"),
    ),
    "claude-sonnet-4-6": Price(
        input=Decimal("3"),
        output=Decimal("15"),
        cache_write_5m=Decimal("3.75"),
        cache_write_1h=Decimal("6"),
        # Marked "computed" in the notes (0.1x input), not read off a page.
        cache_read=Decimal("0.30"),
    ),
    "claude-haiku-4-5": Price(
        input=Decimal("1"),
        output=Decimal("5"),
        cache_write_5m=Decimal("1.25"),
        cache_write_1h=Decimal("2"),
        cache_read=Decimal("0.10"),
    ),
}

#: The built-in prices, by model alias (read-only).
DEFAULT_PRICES: Final[Mapping[str, Price]] = types.MappingProxyType(_DEFAULT_PRICES)


def _decimal_from(value: object, field: str) -> Decimal | None:
    """A price given as a Decimal, int, float or numeric string, as a Decimal."""
    if value is None or isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise InvalidInput(field, f"must be a price, not {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(field, f"must be a finite price, not {value!r}")
        # Through str, so 0.1 is 0.1 and not its binary approximation.
        return Decimal(repr(value))
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            raise InvalidInput(field, f"is not a number: {value!r}") from None
    raise InvalidInput(field, f"must be a number or numeric string, not {type(value).__name__}")


def _threshold_from(value: object, field: str) -> int | None:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise InvalidInput(field, f"is not a whole number of tokens: {value!r}") from None
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise InvalidInput(field, f"must be a whole number of tokens, not {value!r}")


def _price_from_mapping(base: Price, fields: Mapping[str, Any], where: str) -> Price:
    """``base`` with the fields given in ``fields`` (strings and numbers accepted)."""
    changes: dict[str, Any] = {}
    for key, value in fields.items():
        field = f"{where}.{key}"
        if key in PRICE_FIELDS:
            changes[key] = _decimal_from(value, field)
        elif key == "long_context_threshold":
            changes[key] = _threshold_from(value, field)
        else:
            known = ", ".join((*PRICE_FIELDS, "long_context_threshold"))
            raise InvalidInput(field, f"unknown price field; known fields: {known}")
    return dataclasses.replace(base, **changes)


class PriceTable:
    """Per-model prices, the built-in ones plus the caller's overrides.

    ``overrides`` maps a model id to a :class:`Price` (which replaces that
    model's prices entirely) or to a mapping of some of its fields, with values
    as numbers or numeric strings, such as ``{"cache_read": "0.20"}``: the
    fields given replace the built-in ones and the others are kept (all unknown
    for a model convo does not know).
    """

    def __init__(self, overrides: Mapping[str, Price | Mapping[str, Any]] | None = None) -> None:
        prices = dict(DEFAULT_PRICES)
        if overrides is not None:
            if not isinstance(overrides, Mapping):
                raise InvalidInput("overrides", "must be a mapping of model id to prices")
            for model, given in overrides.items():
                where = f"overrides[{model!r}]"
                if not isinstance(model, str) or not model:
                    raise InvalidInput(where, "a model id must be a non-empty string")
                if isinstance(given, Price):
                    prices[model] = given
                elif isinstance(given, Mapping):
                    base = prices.get(model, Price())
                    try:
                        prices[model] = _price_from_mapping(base, given, where)
                    except InvalidInput as exc:
                        if exc.field.startswith(where):
                            raise
                        # Raised by Price itself, which does not know the model.
                        raise InvalidInput(f"{where}.{exc.field}", exc.problem) from None
                else:
                    raise InvalidInput(
                        where, f"must be a Price or a mapping, not {type(given).__name__}"
                    )
        self._prices: Final = types.MappingProxyType(prices)

    def price(self, model: str) -> Price | None:
        """The prices of ``model``; a dated snapshot id has its alias's prices.

        ``None`` for a model this table does not know (never a guess).
        """
        found = self._prices.get(model)
        if found is None:
            alias = _SNAPSHOT_SUFFIX.sub("", model)
            if alias != model:
                found = self._prices.get(alias)
        return found

    def cost(self, model: str, usage: Mapping[str, Any]) -> Decimal | None:
        """What a request with this ``usage`` cost, in USD; ``None`` if unknown.

        ``usage`` is the API's usage object as a mapping (``message.usage.model_dump()``).
        Cache writes are split by ``cache_creation`` when it is there, and all
        count as 5-minute writes when it is not. The cost is unknown for an
        unknown model, or when tokens were spent on something whose price is
        unknown (an unused unknown price does not matter).
        """
        prices = self.price(model)
        if prices is None:
            return None
        if not isinstance(usage, Mapping):
            raise InvalidInput("usage", "must be the API's usage mapping")
        input_tokens = _tokens(usage, "input_tokens")
        output_tokens = _tokens(usage, "output_tokens")
        cache_writes = _tokens(usage, "cache_creation_input_tokens")
        cache_reads = _tokens(usage, "cache_read_input_tokens")

        breakdown = usage.get("cache_creation")
        if breakdown is None:
            writes_5m, writes_1h = cache_writes, 0
        elif isinstance(breakdown, Mapping):
            writes_5m = _tokens(breakdown, "ephemeral_5m_input_tokens", "usage.cache_creation")
            writes_1h = _tokens(breakdown, "ephemeral_1h_input_tokens", "usage.cache_creation")
            # Writes the breakdown does not account for are billed as 5-minute ones.
            writes_5m += max(0, cache_writes - writes_5m - writes_1h)
        else:
            raise InvalidInput("usage.cache_creation", "must be a mapping or None")

        prompt_tokens = input_tokens + writes_5m + writes_1h + cache_reads
        threshold = prices.long_context_threshold
        if threshold is not None and prompt_tokens > threshold:
            input_price, output_price = prices.long_input, prices.long_output
        else:
            input_price, output_price = prices.input, prices.output

        total = Decimal(0)
        for tokens, price in (
            (input_tokens, input_price),
            (output_tokens, output_price),
            (writes_5m, prices.cache_write_5m),
            (writes_1h, prices.cache_write_1h),
            (cache_reads, prices.cache_read),
        ):
            if tokens == 0:
                continue
            if price is None:
                return None
            total += tokens * price
        return total / TOKENS_PER_PRICE_UNIT


def _tokens(usage: Mapping[str, Any], key: str, where: str = "usage") -> int:
    """A token count from a usage mapping: missing or None is 0."""
    value = usage.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{where}.{key}", f"must be a whole number of tokens, not {value!r}")
    return value
