"""Sending a turn through the Messages API: ``conv.send()`` and ``conv.stream()``.

The order of things is what makes it durable:

1. Claim the conversation (one send in flight at a time, across processes)
   and store the user turn, in one transaction, before any API call.
2. Build the context window (compacting if needed): valid, within budget.
3. Wait for the store's rate limits, then call the API. Retries are the
   SDK's own (429, 5xx, 529, connection errors, honouring ``retry-after``).
4. Store the reply with its usage, model, stop reason, request id and
   latency; calibrate the token counts; release the claim.

If the call fails, the user turn stays, marked ``failed``: the next send
sends it again, merged with the new turn, so no text is lost and no two user
turns dangle. A stream that breaks off keeps what arrived as an
``incomplete`` assistant turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from ._message import Message
from ._response import turn_from_response
from .errors import APIError, StreamInterrupted

if TYPE_CHECKING:
    from ._conversation import Conversation
    from ._window import ContextWindow

logger = logging.getLogger("convo.api")

#: Text of a streamed reply's block types that may be kept when it breaks off.
_PARTIAL_KEEPS: Final = frozenset({"text"})


def _usage_counts(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {
        key: int(usage.get(key) or 0)
        for key in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        )
    }


def _log_call(
    conv: Conversation,
    window: ContextWindow,
    *,
    outcome: str,
    latency_ms: int,
    message: Message | None = None,
    error: BaseException | None = None,
) -> None:
    """One structured record per API call. Never headers, never keys."""
    usage = _usage_counts(message.usage if message else None)
    request_id = message.request_id if message else getattr(error, "request_id", None)
    fields = {
        "conversation_id": conv.id,
        "model": window.params["model"],
        "estimated_input_tokens": window.estimated_tokens,
        **usage,
        "latency_ms": latency_ms,
        "request_id": request_id,
        "outcome": outcome,
        "stop_reason": message.stop_reason if message else None,
    }
    level = logging.INFO if outcome == "ok" else logging.WARNING
    logger.log(
        level,
        "messages call %s conversation=%s model=%s input=%d output=%d cache_read=%d "
        "cache_write=%d latency_ms=%d request_id=%s",
        outcome,
        conv.id,
        fields["model"],
        usage["input_tokens"],
        usage["output_tokens"],
        usage["cache_read_input_tokens"],
        usage["cache_creation_input_tokens"],
        latency_ms,
        request_id,
        extra={"convo": fields},
    )


def wrap_api_error(exc: BaseException, *, stream: bool = False) -> APIError:
    """A convo error for an SDK or transport error, keeping what it knew."""
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    error_type = getattr(exc, "type", None)
    if error_type is None and isinstance(body, dict):
        error_type = (body.get("error") or {}).get("type")
    request_id = getattr(exc, "request_id", None)
    kind = StreamInterrupted if stream else APIError
    what = "the stream broke off" if stream else "the Messages API call failed"
    detail = f"{type(exc).__name__}: {exc}".strip()
    return kind(
        f"{what} ({detail})",
        status_code=status if isinstance(status, int) else None,
        error_type=error_type if isinstance(error_type, str) else None,
        request_id=request_id if isinstance(request_id, str) else None,
    )


def _is_sdk_failure(exc: BaseException) -> bool:
    import anthropic
    import httpx2

    return isinstance(exc, anthropic.AnthropicError | httpx2.HTTPError)


def _needs_streaming(exc: ValueError) -> bool:
    # The SDK refuses a non-streaming call whose max_tokens could outlast its timeout.
    return "stream" in str(exc).lower()


class Sending:
    """One turn in flight: claim, user turn, window. Shared by send and stream."""

    def __init__(self, conv: Conversation, content: Any, params: dict[str, Any]) -> None:
        self.conv = conv
        self.store = conv.store
        self.client = self.store.client  # MissingAPIKey before anything is written
        turn = self.store.make_turn("user", content)
        max_tokens = params.get("max_tokens")
        conv._check_fits(turn.token_count, **({"max_tokens": max_tokens} if max_tokens else {}))
        self.user_message, row, self.owner = self.store.claim_and_append(conv.id, turn)
        conv._load(row)
        try:
            self.window = conv.window(**params)
            self.request = self.store.outbound(self.window.params)
        except BaseException:
            self.fail()
            raise

    def fail(self) -> None:
        """The call did not produce a reply: mark the user turn, release the claim."""
        model = self.window.params["model"] if hasattr(self, "window") else None
        self.store.set_status(self.conv.id, self.user_message.seq, "failed", model=model)
        self.store.release(self.conv.id, self.owner)

    def finish(self, response: Any, *, latency_ms: int, status: str = "complete") -> Message:
        """Store the reply (and calibrate), then release the claim."""
        try:
            turn = turn_from_response(
                self.store,
                response,
                latency_ms=latency_ms,
                status=status,  # type: ignore[arg-type]
            )
            return self.conv._store_reply(turn, self.window)
        finally:
            self.store.release(self.conv.id, self.owner)


def send(conv: Conversation, content: Any, params: dict[str, Any]) -> Message:
    """Send one user turn and return the stored reply (see the module docstring)."""
    sending = Sending(conv, content, params)
    started = time.monotonic()
    try:
        with conv.store.rate_limiter.slot(sending.window.estimated_tokens):
            try:
                response = sending.client.messages.create(**sending.request)
            except ValueError as exc:
                if not _needs_streaming(exc):
                    raise
                with sending.client.messages.stream(**sending.request) as stream:
                    response = stream.get_final_message()
    except BaseException as exc:
        latency = int((time.monotonic() - started) * 1000)
        sending.fail()
        if _is_sdk_failure(exc):
            error = wrap_api_error(exc)
            _log_call(conv, sending.window, outcome="error", latency_ms=latency, error=error)
            raise error from exc
        raise
    latency = int((time.monotonic() - started) * 1000)
    message = sending.finish(response, latency_ms=latency)
    _log_call(conv, sending.window, outcome="ok", latency_ms=latency, message=message)
    return message


class ConversationStream:
    """A streamed reply: iterate it for text deltas; ``.message`` is the stored turn.

    Use it as a context manager (``with conv.stream("hi") as reply:``). When
    the block ends, the reply is stored: complete, or, if the stream broke
    off or the block was left early, as an ``incomplete`` turn with the text
    that arrived (a :class:`StreamInterrupted` error is raised for a broken
    stream; an early exit or Ctrl-C is not turned into an error).
    """

    def __init__(self, conv: Conversation, content: Any, params: dict[str, Any]) -> None:
        self._conv = conv
        self._content = content
        self._params = params
        self._sending: Sending | None = None
        self._manager: Any = None
        self._stream: Any = None
        self._started = 0.0
        self._limit: Any = None
        self._iteration = "not started"
        self.message: Message | None = None

    def __enter__(self) -> ConversationStream:
        store = self._conv.store
        self._sending = Sending(self._conv, self._content, self._params)
        self._started = time.monotonic()
        try:
            self._limit = store.rate_limiter.slot(self._sending.window.estimated_tokens)
            self._limit.__enter__()
            try:
                self._manager = self._sending.client.messages.stream(**self._sending.request)
                self._stream = self._manager.__enter__()
            except BaseException as exc:
                self._limit.__exit__(type(exc), exc, exc.__traceback__)
                raise
        except BaseException as exc:
            self._sending.fail()
            if _is_sdk_failure(exc):
                raise wrap_api_error(exc) from exc
            raise
        return self

    def __iter__(self) -> Iterator[str]:
        """The reply's text, delta by delta, as it arrives."""
        assert self._stream is not None, "use the stream inside its `with` block"
        self._iteration = "started"
        try:
            yield from self._stream.text_stream
        except BaseException as exc:
            if _is_sdk_failure(exc):
                raise wrap_api_error(exc, stream=True) from exc
            raise
        self._iteration = "done"

    @property
    def text_stream(self) -> Iterator[str]:
        return iter(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sending = self._sending
        assert sending is not None
        broken: BaseException | None = None
        if exc is None and self._iteration == "not started":
            try:
                self._stream.until_done()  # the caller only wants the final message
                self._iteration = "done"
            except BaseException as failure:
                broken = failure
        latency = int((time.monotonic() - self._started) * 1000)
        try:
            if exc is None and self._iteration == "done":
                final = self._stream.get_final_message()
                self.message = sending.finish(final, latency_ms=latency)
                outcome = "ok"
            else:
                # Broken off, or left early: keep what arrived, visibly incomplete.
                self.message = sending.finish(
                    self._partial(), latency_ms=latency, status="incomplete"
                )
                outcome = "interrupted"
            _log_call(
                self._conv,
                sending.window,
                outcome=outcome,
                latency_ms=latency,
                message=self.message,
            )
        finally:
            self._manager.__exit__(exc_type, exc, tb)
            self._limit.__exit__(exc_type, exc, tb)
        if broken is not None:
            if _is_sdk_failure(broken):
                raise wrap_api_error(broken, stream=True) from broken
            raise broken

    def _partial(self) -> dict[str, Any]:
        """What arrived before the stream broke off, as a response-shaped dict."""
        try:
            snapshot = self._stream.current_message_snapshot
        except (AssertionError, AttributeError):
            snapshot = None  # not even message_start arrived
        blocks = []
        if snapshot is not None:
            for block in snapshot.content:
                if block.type in _PARTIAL_KEEPS and getattr(block, "text", "").strip():
                    blocks.append({"type": "text", "text": block.text})
        return {
            "role": "assistant",
            "content": blocks,
            "model": getattr(snapshot, "model", None),
            "stop_reason": None,
            "usage": snapshot.usage.model_dump(mode="json") if snapshot is not None else None,
            "_request_id": getattr(self._stream, "request_id", None),
        }
