"""Usage and cost: requests, tokens by kind, cache hits, dollars, errors, latency.

Plain functions over the records the store reads: one record per API call
(each stored reply, each summary Claude wrote) and one per failed call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Literal

from ._pricing import PriceTable

GroupBy = Literal["conversation", "model", "day"]
GROUPINGS: Final = ("conversation", "model", "day")


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One API call as stored."""

    conversation_id: str
    model: str | None
    created_at: datetime
    usage: Mapping[str, Any] | None
    latency_ms: int | None
    failed: bool = False
    kind: str = "reply"  # "reply", "summary", or "failed"


@dataclass(slots=True)
class UsageStats:
    """Totals for one group (or for everything)."""

    key: str
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: Decimal | None = Decimal(0)
    #: Calls whose cost is unknown (a model without a price): cost_usd is then None.
    unpriced_requests: int = 0
    latencies_ms: list[int] = field(default_factory=list, repr=False)

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    @property
    def cache_hit_ratio(self) -> float | None:
        """Share of input tokens read from the prompt cache."""
        total = self.total_input_tokens
        return self.cache_read_input_tokens / total if total else None

    def latency_percentile(self, percent: float) -> int | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        rank = max(1, math.ceil(percent / 100 * len(ordered)))
        return ordered[rank - 1]

    @property
    def latency_p50_ms(self) -> int | None:
        return self.latency_percentile(50)

    @property
    def latency_p95_ms(self) -> int | None:
        return self.latency_percentile(95)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "requests": self.requests,
            "errors": self.errors,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_hit_ratio": self.cache_hit_ratio,
            "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
            "unpriced_requests": self.unpriced_requests,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
        }

    def add(self, record: CallRecord, prices: PriceTable) -> None:
        if record.failed:
            self.errors += 1
            if not record.usage:
                return
        # A failed call with usage (a stream cut or cancelled mid-reply) was billed
        # for what it reported: it counts as a request too.
        self.requests += 1
        usage = record.usage or {}
        self.input_tokens += int(usage.get("input_tokens") or 0)
        self.output_tokens += int(usage.get("output_tokens") or 0)
        self.cache_creation_input_tokens += int(usage.get("cache_creation_input_tokens") or 0)
        self.cache_read_input_tokens += int(usage.get("cache_read_input_tokens") or 0)
        if record.latency_ms is not None:
            self.latencies_ms.append(record.latency_ms)
        cost = prices.cost(record.model, usage) if record.model and usage else None
        if cost is None:
            self.unpriced_requests += 1
            self.cost_usd = None  # never a guess
        elif self.cost_usd is not None:
            self.cost_usd += cost


_KEYS: Final[dict[str, Callable[[CallRecord], str]]] = {
    "conversation": lambda r: r.conversation_id,
    "model": lambda r: r.model or "(unknown)",
    "day": lambda r: r.created_at.date().isoformat(),
}


@dataclass(frozen=True, slots=True)
class UsageReport:
    total: UsageStats
    groups: list[UsageStats]
    group_by: str | None


def summarize(
    records: Iterable[CallRecord], prices: PriceTable, *, group_by: GroupBy | None = None
) -> UsageReport:
    """Totals, and per group if ``group_by`` is given (sorted by key)."""
    total = UsageStats("total")
    groups: dict[str, UsageStats] = {}
    key_of = _KEYS[group_by] if group_by else None
    for record in records:
        total.add(record, prices)
        if key_of is not None:
            key = key_of(record)
            groups.setdefault(key, UsageStats(key)).add(record, prices)
    return UsageReport(total, [groups[k] for k in sorted(groups)], group_by)
