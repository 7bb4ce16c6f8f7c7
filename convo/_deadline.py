"""A send's deadline (``send_timeout``) over every attempt of its API call.

The SDK retries a failed call itself, and gives each attempt the whole
per-request ``timeout``, so a per-request timeout alone does not bound a call:
three attempts and their waits can take several times as long. :class:`Deadline`
is SDK middleware (the SDK's public middleware hook, which it runs once per
attempt inside its retry loop) that holds the whole call to one deadline:

* each attempt gets the time left as its timeout;
* no attempt starts once the deadline has passed;
* after a failed attempt that the SDK would retry, if the wait before the
  retry (the server's ``retry-after``, else the SDK's longest backoff for that
  retry) would end past the deadline, the call ends at once.

It ends the call with :class:`~convo.errors.SendTimedOut`, raised without a
cause so that the SDK passes it through untried. Once a stream's headers have
arrived, the send's heartbeat closes the stream at the deadline instead
(``convo._heartbeat``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Final

from .errors import SendTimedOut

__all__ = ["Deadline"]

#: The SDK's backoff without ``retry-after``: 0.5 s doubling per retry, at most 8 s.
_FIRST_BACKOFF_S: Final = 0.5
_LONGEST_BACKOFF_S: Final = 8.0
#: Statuses the SDK retries when the server does not say (``x-should-retry``).
_RETRIED_STATUSES: Final = frozenset({408, 409, 429})


class Deadline:
    """Every attempt of one API call within ``seconds`` of the send's start.

    A sync client takes it as a middleware callable; an async one takes
    :meth:`handle_async` (``_bridge.AwaitingClient.with_middleware``). Not an
    ``anthropic.Middleware`` subclass, so that importing convo does not import
    the SDK.
    """

    def __init__(self, deadline: float, seconds: float, *, max_retries: int) -> None:
        self.deadline = deadline  # time.monotonic() seconds
        self.seconds = seconds
        self.max_retries = max_retries

    def handle(self, request: Any, call_next: Any) -> Any:
        try:
            response = call_next(self._within(request))
        except Exception as exc:
            self._check_failure(request, exc)
            raise
        self._check_retry(request, response)
        return response

    __call__ = handle

    async def handle_async(self, request: Any, call_next: Any) -> Any:
        try:
            response = await call_next(self._within(request))
        except Exception as exc:
            self._check_failure(request, exc)
            raise
        self._check_retry(request, response)
        return response

    def _within(self, request: Any) -> Any:
        """The attempt, with the time left as its timeout; none past the deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out(f"before attempt {request.retries_taken + 1} could start")
        given = request.timeout
        if isinstance(given, int | float) and given <= left:
            return request
        return request.copy(timeout=left)

    def _check_retry(self, request: Any, response: Any) -> None:
        """End the call now if the SDK would retry it only after the deadline."""
        http = response.http_response
        if http.is_success or not self._retried(request, http):
            return
        wait = _retry_after(http.headers)
        if wait is None:
            wait = _backoff(request.retries_taken)
        if time.monotonic() + wait >= self.deadline:
            raise self._timed_out(
                f"the API answered HTTP {http.status_code} and the SDK would retry only after "
                f"{wait:.1f} s"
            )

    def _check_failure(self, request: Any, exc: Exception) -> None:
        """After an attempt that could not connect or timed out: as :meth:`_check_retry`."""
        import anthropic  # loaded already: a client is making this call

        if not isinstance(exc, anthropic.APIConnectionError) or not self._retries_left(request):
            return
        if time.monotonic() + _backoff(request.retries_taken) >= self.deadline:
            kind = "timed out" if isinstance(exc, anthropic.APITimeoutError) else "failed"
            raise self._timed_out(f"(attempt {request.retries_taken + 1} {kind})") from None

    def _retries_left(self, request: Any) -> bool:
        retries = request.max_retries
        if not isinstance(retries, int):
            retries = self.max_retries
        return bool(request.retries_taken < retries)

    def _retried(self, request: Any, http: Any) -> bool:
        """Whether the SDK retries after this response (its documented policy)."""
        if not self._retries_left(request):
            return False
        should = http.headers.get("x-should-retry")
        if should in ("true", "false"):
            return bool(should == "true")
        status = int(http.status_code)
        return status in _RETRIED_STATUSES or status >= 500

    def _timed_out(self, when: str) -> SendTimedOut:
        return SendTimedOut(
            f"send_timeout ({self.seconds:g} s) reached {when}; nothing was stored from the "
            "call (the user turn is kept and sent again with the next one)"
        )


def _backoff(retries_taken: int) -> float:
    """The longest wait the SDK's own backoff makes before retry ``retries_taken + 1``."""
    return min(_FIRST_BACKOFF_S * 2.0**retries_taken, _LONGEST_BACKOFF_S)


def _retry_after(headers: Any) -> float | None:
    """The server's ``retry-after`` (or ``retry-after-ms``) in seconds, if it gave one."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue  # an HTTP date: the SDK's own parsing applies; no early end
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    return None
