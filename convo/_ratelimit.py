"""Client-side rate limits shared by every conversation of a store, across threads.

Three limits, each optional: requests per minute and input tokens per minute
(each over a sliding 60-second window of request *starts*), and requests
running at once. A request takes a slot before it is sent::

    limiter = RateLimiter(requests_per_minute=50, max_concurrent=4)
    with limiter.slot(estimated_input_tokens):
        client.messages.create(...)

Taking a slot blocks until the request may start, without holding the lock
while it waits, and records the start; leaving the block (also by an
exception) frees the concurrency slot. Each wait is logged once, at INFO on
the ``convo.ratelimit`` logger, with structured fields under ``record.convo``.
Waiting threads are not served in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Final

from convo.errors import InvalidInput

__all__ = ["AsyncRateLimiter", "LimitedClient", "RateLimiter"]

logger = logging.getLogger("convo.ratelimit")

#: The sliding window of the per-minute limits, in seconds.
WINDOW_SECONDS: Final = 60.0


def _check_limit(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(field, f"must be a positive whole number or None, not {value!r}")
    return value


class RateLimiter:
    """Requests per minute, input tokens per minute and concurrent requests, client-side.

    A limit left at None is not enforced; with none set, :meth:`slot` never
    waits. ``clock`` and ``sleep`` are injectable for tests (``sleep`` must let
    ``clock`` advance by the time given).
    """

    def __init__(
        self,
        *,
        requests_per_minute: int | None = None,
        input_tokens_per_minute: int | None = None,
        max_concurrent: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.requests_per_minute: Final = _check_limit("requests_per_minute", requests_per_minute)
        self.input_tokens_per_minute: Final = _check_limit(
            "input_tokens_per_minute", input_tokens_per_minute
        )
        self.max_concurrent: Final = _check_limit("max_concurrent", max_concurrent)
        self._clock: Final = clock
        self._sleep: Final = sleep
        self._condition: Final = threading.Condition()
        # Starts inside the window, oldest first; kept only for the limits that are set.
        self._request_starts: deque[float] = deque()
        self._token_starts: deque[tuple[float, int]] = deque()
        self._tokens_in_window = 0
        self._running = 0

    def slot(self, input_tokens: int) -> AbstractContextManager[None]:
        """A context manager that holds one request slot while its block runs.

        Entering it waits until a request of ``input_tokens`` input tokens may
        start. A request larger than ``input_tokens_per_minute`` could never
        start: :class:`InvalidInput` is raised here, at once.
        """
        if isinstance(input_tokens, bool) or not isinstance(input_tokens, int) or input_tokens < 0:
            raise InvalidInput(
                "input_tokens", f"must be a whole number of at least 0, not {input_tokens!r}"
            )
        limit = self.input_tokens_per_minute
        if limit is not None and input_tokens > limit:
            raise InvalidInput(
                "input_tokens",
                f"a request of {input_tokens} input tokens can never fit the client-side limit "
                f"of {limit} input tokens per minute",
            )
        return _Slot(self, input_tokens)

    def _attempt(self, input_tokens: int) -> tuple[str, float | None] | None:
        """Start a request now if every limit allows it: recorded, running; None.

        Otherwise what stands in the way: ``("max_concurrent", None)`` (wait
        for a running request to finish) or ``(limit, seconds)`` to wait.
        Callers make it atomic: the sync limiter under its lock, the async one
        by not awaiting between the check and the record.
        """
        if self.max_concurrent is not None and self._running >= self.max_concurrent:
            return "max_concurrent", None
        now = self._clock()
        self._forget_starts_before(now - WINDOW_SECONDS)
        delay, limit = self._delay(now, input_tokens)
        if delay <= 0:
            self._record(now, input_tokens)
            self._running += 1
            return None
        return limit, delay

    def _acquire(self, input_tokens: int) -> None:
        """Wait until a request may start, then record it and take a running slot."""
        logged = False
        while True:
            with self._condition:
                blocked = self._attempt(input_tokens)
                if blocked is None:
                    return
                limit, delay = blocked
                if not logged:
                    self._log_wait(limit, delay, input_tokens)
                    logged = True
                if delay is None:
                    self._condition.wait()
                    continue
            # Outside the lock: other threads keep taking and freeing slots meanwhile.
            self._sleep(delay)

    def _release(self) -> None:
        with self._condition:
            self._running -= 1
            self._condition.notify_all()

    def _forget_starts_before(self, cutoff: float) -> None:
        """Drop the starts that have left the window (at or before ``cutoff``)."""
        while self._request_starts and self._request_starts[0] <= cutoff:
            self._request_starts.popleft()
        while self._token_starts and self._token_starts[0][0] <= cutoff:
            self._tokens_in_window -= self._token_starts.popleft()[1]

    def _delay(self, now: float, input_tokens: int) -> tuple[float, str]:
        """Seconds until a request may start (0 if now), and the limit that decides it."""
        delay, limit = 0.0, ""
        rpm = self.requests_per_minute
        if rpm is not None and len(self._request_starts) >= rpm:
            # The oldest starts must leave until one fewer than the limit remain.
            leaving = self._request_starts[len(self._request_starts) - rpm]
            delay, limit = leaving + WINDOW_SECONDS - now, "requests_per_minute"
        tpm = self.input_tokens_per_minute
        if tpm is not None and self._tokens_in_window + input_tokens > tpm:
            excess = self._tokens_in_window + input_tokens - tpm
            freed = 0
            for start, tokens in self._token_starts:
                freed += tokens
                if freed >= excess:
                    token_delay = start + WINDOW_SECONDS - now
                    if token_delay > delay:
                        delay, limit = token_delay, "input_tokens_per_minute"
                    break
        return delay, limit

    def _record(self, now: float, input_tokens: int) -> None:
        if self.requests_per_minute is not None:
            self._request_starts.append(now)
        if self.input_tokens_per_minute is not None and input_tokens:
            self._token_starts.append((now, input_tokens))
            self._tokens_in_window += input_tokens

    def _log_wait(self, limit: str, seconds: float | None, input_tokens: int) -> None:
        value = getattr(self, limit)
        if seconds is None:
            message = "rate limit: waiting for a running request to finish (%s=%d)"
            args: tuple[object, ...] = (limit, value)
        else:
            message = "rate limit: waiting %.3f s for a request of %d input tokens (%s=%d)"
            args = (seconds, input_tokens, limit, value)
        fields = {
            "limit": limit,
            "limit_value": value,
            "wait_seconds": seconds,
            "input_tokens": input_tokens,
        }
        logger.info(message, *args, extra={"convo": fields})


class AsyncRateLimiter(RateLimiter):
    """The same limits for the async store: waiting awaits on the event loop.

    The policy (:meth:`RateLimiter._attempt`) is shared; only the waiting
    differs. Core code run by the async store takes slots as the sync store
    does (``with limiter.slot(n):``); entering one awaits :meth:`acquire`.
    One limiter serves every conversation of the store, on one event loop.
    """

    def __init__(
        self,
        *,
        requests_per_minute: int | None = None,
        input_tokens_per_minute: int | None = None,
        max_concurrent: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            requests_per_minute=requests_per_minute,
            input_tokens_per_minute=input_tokens_per_minute,
            max_concurrent=max_concurrent,
            clock=clock,
        )
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self, input_tokens: int) -> None:
        """Wait until a request may start, then record it and take a running slot."""
        logged = False
        while True:
            blocked = self._attempt(input_tokens)
            if blocked is None:
                return
            limit, delay = blocked
            if not logged:
                self._log_wait(limit, delay, input_tokens)
                logged = True
            if delay is None:
                freed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(freed)
                await freed
            else:
                await asyncio.sleep(delay)

    def _acquire(self, input_tokens: int) -> None:
        from ._bridge import wait

        wait(self.acquire(input_tokens))

    def _release(self) -> None:
        self._running -= 1
        waiters, self._waiters = self._waiters, []
        for freed in waiters:
            if not freed.done():
                freed.set_result(None)


class _Slot(AbstractContextManager[None]):
    """One request's slot: taken on entry, its running slot freed on exit."""

    def __init__(self, limiter: RateLimiter, input_tokens: int) -> None:
        self._limiter = limiter
        self._input_tokens = input_tokens
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise RuntimeError("a rate-limit slot cannot be entered twice")
        self._limiter._acquire(self._input_tokens)
        self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._held:
            self._held = False
            self._limiter._release()


class LimitedClient:
    """An ``anthropic`` client whose ``messages.create`` calls take a slot of ``limiter`` first.

    Everything else passes through to ``client``. ``estimate`` gives the input
    tokens of a request from its keyword arguments. The store hands its
    summarizer a client wrapped this way, so summaries share the store's limits.
    """

    def __init__(
        self, client: Any, limiter: RateLimiter, estimate: Callable[[dict[str, Any]], int]
    ) -> None:
        self._client = client
        self.messages = _LimitedMessages(client.messages, limiter, estimate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _LimitedMessages:
    def __init__(
        self, messages: Any, limiter: RateLimiter, estimate: Callable[[dict[str, Any]], int]
    ) -> None:
        self._messages = messages
        self._limiter = limiter
        self._estimate = estimate

    def create(self, **params: Any) -> Any:
        with self._limiter.slot(self._estimate(params)):
            return self._messages.create(**params)

    def count_tokens(self, **params: Any) -> Any:
        # Its own API rate limit, but a request all the same: it counts against the
        # requests per minute and the concurrency, not against the input tokens.
        with self._limiter.slot(0):
            return self._messages.count_tokens(**params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._messages, name)
