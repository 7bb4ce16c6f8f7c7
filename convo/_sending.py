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
turns dangle. A stream that breaks off, or ends without ``message_stop``,
keeps what arrived as an ``incomplete`` assistant turn, with the usage the
stream reported.

While the call is alive a heartbeat (``_heartbeat``) renews the claim every third of
the store's ``send_lease``, so a long call (SDK retries included) keeps
other senders out, and a dead sender's claim lapses within one lease. If the
database fails after the reply arrived, the reply goes to the store's outbox
(a local file) and :class:`ReplyNotStored` carries it to the caller.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import exc as sa_exc

from ._budget import DEFAULT_MAX_TOKENS
from ._message import Message
from ._models import utcnow
from ._response import turn_from_response, usage_dict
from ._turns import AlreadyAnswered, check_key, check_positive, reply_key
from .errors import APIError, DatabaseError, InvalidInput, ReplyNotStored, StreamInterrupted

if TYPE_CHECKING:
    from ._conversation import Conversation
    from ._models import ConversationRow
    from ._records import WindowRead, WindowReader
    from ._turns import Turn
    from ._window import ContextWindow

logger = logging.getLogger("convo.api")

#: Text of a streamed reply's block types that may be kept when it breaks off.
_PARTIAL_KEEPS: Final = frozenset({"text"})
#: Parameters convo sets itself from the conversation.
OWN_PARAMS: Final = ("messages", "system", "model")
_DB_FAILURES: Final = (DatabaseError, sa_exc.SQLAlchemyError)


def check_request_params(params: dict[str, Any]) -> int:
    """Check the request parameters a caller passed; return ``max_tokens``.

    Raises :class:`InvalidInput` before anything is written or sent.
    """
    for name in OWN_PARAMS:
        if name in params:
            raise InvalidInput(name, "is set by convo from the conversation; do not pass it")
    if "stream" in params:
        raise InvalidInput(
            "stream",
            "is not a parameter here: use conv.stream() for a streamed reply (conv.send() "
            "streams under the hood when max_tokens needs it)",
        )
    max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS)
    check_positive("max_tokens", max_tokens)
    return int(max_tokens)


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


def wrap_api_error(
    exc: BaseException, *, stream: bool = False, sending: Sending | None = None
) -> APIError:
    """A convo error for an SDK or transport error, keeping what it knew.

    A 400 naming one message of the request (``messages.3...``) also names
    the stored turns behind it and how to leave them out (``turn_seqs``).
    """
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    error_type = getattr(exc, "type", None)
    if error_type is None and isinstance(body, dict):
        error_type = (body.get("error") or {}).get("type")
    request_id = getattr(exc, "request_id", None)
    kind = StreamInterrupted if stream else APIError
    what = "the stream broke off" if stream else "the Messages API call failed"
    detail = f"{type(exc).__name__}: {exc}".strip()
    if status is None:
        # A connection that failed: say where it was going (a URL carries no key).
        try:
            url = getattr(getattr(exc, "request", None), "url", None)
        except RuntimeError:  # an httpx2 error without its request
            url = None
        if url is not None:
            detail += f" to {url}"
    seqs: tuple[int, ...] = ()
    hint = ""
    if status == 400 and sending is not None and hasattr(sending, "window"):
        seqs, hint = _rejected_turns(detail, sending)
    error = kind(
        f"{what} ({detail}){hint}",
        status_code=status if isinstance(status, int) else None,
        error_type=error_type if isinstance(error_type, str) else None,
        request_id=request_id if isinstance(request_id, str) else None,
    )
    error.turn_seqs = seqs
    return error


_MESSAGE_INDEX: Final = re.compile(r"\bmessages\.(\d+)")


def _rejected_turns(detail: str, sending: Sending) -> tuple[tuple[int, ...], str]:
    """The stored turns behind the request message a 400 names, and what to do about them."""
    match = _MESSAGE_INDEX.search(detail)
    message_seqs = sending.window.message_seqs
    if match is None or int(match.group(1)) >= len(message_seqs):
        return (), ""
    index = int(match.group(1))
    seqs = message_seqs[index]
    if not seqs:
        return (), ""
    conversation_id = sending.conv.id
    which = f"turn {seqs[0]}" if len(seqs) == 1 else f"turns {', '.join(map(str, seqs))}"
    return seqs, (
        f". The API rejected message {index} of the request, made from {which} of "
        f"{conversation_id}: if a stored turn is at fault, leave it out of every request "
        f"with conv.exclude(SEQ) or `convo exclude {conversation_id} SEQ` (it stays stored)"
    )


def _is_sdk_failure(exc: BaseException) -> bool:
    import anthropic
    import httpx2

    return isinstance(exc, anthropic.AnthropicError | httpx2.HTTPError)


def _needs_streaming(exc: ValueError) -> bool:
    # The SDK refuses a non-streaming call whose max_tokens could outlast its timeout.
    return "stream" in str(exc).lower()


class Sending:
    """One turn in flight: claim, user turn, window. Shared by send and stream.

    Every parameter is checked before anything is written. If the key's reply
    is already stored, ``answered`` is that reply and nothing else happens.
    """

    def __init__(
        self,
        conv: Conversation,
        content: Any,
        params: dict[str, Any],
        key: str | None,
        *,
        retake: range | None = None,
    ) -> None:
        self.conv = conv
        self.store = conv.store
        max_tokens = check_request_params(params)
        self.key = check_key(key)
        self.client = self.store.client  # MissingAPIKey before anything is written
        self.answered: Message | None = None
        self.settled = False
        #: A regeneration: the stored user turn sent again, then the replies that
        #: answered it, which the new reply replaces (they stay until it is stored).
        self.retake = retake
        self.claimed = False
        first_read: Callable[[WindowReader], WindowRead] | None = None
        if retake is not None:
            if "key" in params:
                raise InvalidInput("key", "a regeneration sends a stored turn: it takes no key")
            row, owner = self.store.records.claim(conv.id, last_seq=retake[-1])
            self._claimed(row, owner, retake[0])
        else:
            turn = self.store.turns.make_turn("user", content, key=self.key)
            conv._check_fits(turn, max_tokens=max_tokens)

            def claim_and_read(reader: WindowReader) -> WindowRead:
                # The claim, the user turn and the window's read: one transaction.
                claim = self.store.records.claim_and_append(conv.id, turn, reader=reader)
                self._claimed(claim.row, claim.owner, claim.message.seq)
                assert claim.window is not None
                return claim.window

            first_read = claim_and_read

        try:
            self.window = conv._window(
                params, leaving_out=retake[1:] if retake else None, first_read=first_read
            )
            self.request = self.store.turns.outbound(self.window.params)
        except AlreadyAnswered as done:
            self.answered = done.message
            self.settled = True
        except BaseException:
            if self.claimed:
                self.fail()
            raise

    def _claimed(self, row: ConversationRow, owner: str, user_seq: int) -> None:
        """The conversation is claimed for this send: start the lease's heartbeat."""
        conv = self.conv
        conv._load(row)
        self.claimed, self.owner, self.user_seq = True, owner, user_seq
        timeout = self.store.send_timeout
        self.deadline: float | None = None
        #: Whether SDK middleware holds every attempt of the call to the deadline.
        self.attempts_bounded = False
        if timeout is not None:
            self.deadline = time.monotonic() + timeout
            if hasattr(self.client, "with_middleware"):
                from ._deadline import Deadline

                # SDK retries included: the whole call within the deadline.
                retries = getattr(self.client, "max_retries", 0)
                self.client = self.client.with_middleware(
                    Deadline(self.deadline, timeout, max_retries=retries)
                )
                self.attempts_bounded = True
        store = self.store
        self.heartbeat = store._heartbeat_class(
            lambda: store.records.renew(conv.id, owner),
            lease=store.send_lease,
            deadline=self.deadline,
            name=f"conversation {conv.id}",
        )

    def call_options(self) -> dict[str, Any]:
        """For a client without the SDK's middleware hook: the per-request ``timeout``,
        what is left of ``send_timeout`` (else the ``Deadline`` middleware sets each
        attempt's)."""
        if self.deadline is None or self.attempts_bounded or "timeout" in self.request:
            return {}
        return {"timeout": max(1.0, self.deadline - time.monotonic())}

    def fail(self) -> None:
        """The call did not produce a reply: mark the user turn, release the claim.

        A regeneration changes nothing: its user turn keeps the replies it had.
        If the database fails too, the caller still gets the original error
        (an API error stays an API error); the claim then lapses with its lease.
        """
        self.settled = True
        self.heartbeat.stop()
        model = self.window.params["model"] if hasattr(self, "window") else None
        try:
            if self.retake is None:
                self.store.records.set_status(self.conv.id, self.user_seq, "failed", model=model)
            self.store.records.release(self.conv.id, self.owner)
        except _DB_FAILURES as exc:
            logger.warning(
                "conversation %s: could not mark turn %d failed or release the claim: %s",
                self.conv.id,
                self.user_seq,
                exc,
            )

    def finish(
        self,
        response: Any,
        *,
        latency_ms: int,
        status: str = "complete",
        request_id: str | None = None,
    ) -> Message:
        """Store the reply (and calibrate), then release the claim.

        A regeneration's complete reply replaces the old replies in the same
        commit; an incomplete one is kept as an ``excluded`` turn after them
        (stored and counted, never sent), so the old reply stays the answer.
        If the database fails, the reply is kept in the outbox and
        :class:`ReplyNotStored` raised with it.
        """
        self.settled = True
        self.heartbeat.stop()
        replacing = None
        if self.retake is not None:
            if status == "complete":
                replacing = self.retake[1:]
            else:
                status = "excluded"
        turn = turn_from_response(
            self.store,
            response,
            latency_ms=latency_ms,
            status=status,  # type: ignore[arg-type]
            request_id=request_id,
        )
        if self.key is not None:
            turn = replace(turn, key=reply_key(self.key))
        try:
            # The reply and the end of the claim: one commit.
            message = self.conv._store_reply(
                turn, self.window, release=self.owner, replacing=replacing
            )
        except _DB_FAILURES as exc:
            raise self._spool(turn, exc) from exc
        except BaseException:
            self._release_quietly()
            raise
        return message

    def _release_quietly(self) -> None:
        try:
            self.store.records.release(self.conv.id, self.owner)
        except _DB_FAILURES as exc:
            logger.warning("conversation %s: could not release the claim: %s", self.conv.id, exc)

    def _spool(self, turn: Turn, cause: BaseException) -> ReplyNotStored:
        """Keep a reply the database could not take; the error that carries it."""
        reply = turn.as_message(self.conv.id, 0, utcnow())
        outbox_id: str | None = None
        try:
            outbox_id = self.store.records.spool_reply(
                self.conv.id, self.user_seq, self.owner, turn
            )
            kept = (
                f"it is kept in the outbox ({self.store.records.outbox.path}) and will be "
                "written on the next use of the store, or by `convo outbox replay`"
            )
        except OSError as exc:
            logger.error("conversation %s: the outbox cannot be written: %s", self.conv.id, exc)
            kept = f"the outbox could not be written either ({exc}): the reply is only in .reply"
        self._release_quietly()
        return ReplyNotStored(
            f"the API replied (request {turn.request_id}) but the database failed before the "
            f"reply was stored ({type(cause).__name__}: {str(cause).splitlines()[0]}); {kept}",
            reply=reply,
            outbox_id=outbox_id,
        )


class _Reader:
    """Reads a stream's events: its text deltas, and whether ``message_stop`` arrived."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.stopped = False

    def texts(self) -> Iterator[str]:
        for event in self.stream:
            if event.type == "message_stop":
                self.stopped = True
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                yield event.delta.text

    def drain(self) -> None:
        for _ in self.texts():
            pass

    def partial(self) -> dict[str, Any]:
        """What arrived before the stream broke off, as a response-shaped dict."""
        try:
            snapshot = self.stream.current_message_snapshot
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
            # What message_start and any message_delta reported: billed all the same.
            "usage": usage_dict(snapshot.usage) if snapshot is not None else None,
            "_request_id": _request_id(self.stream),
        }


def _request_id(stream: Any) -> str | None:
    try:
        value = stream.request_id
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _cut(sending: Sending) -> StreamInterrupted:
    kept = (
        "kept as an excluded turn; the previous reply stays"
        if sending.retake is not None
        else "kept as an incomplete turn"
    )
    if sending.heartbeat.timed_out:
        return StreamInterrupted(
            f"send_timeout ({sending.store.send_timeout:g} s) reached: the stream was closed; "
            f"the reply so far is {kept}"
        )
    return StreamInterrupted(f"the stream ended before message_stop: the reply so far is {kept}")


def _stream_failure(sending: Sending, exc: BaseException) -> BaseException:
    """The error to raise for an exception out of a stream's events."""
    if sending.heartbeat.timed_out and _is_sdk_failure(exc):
        return _cut(sending)
    if _is_sdk_failure(exc):
        return wrap_api_error(exc, stream=True)
    return exc


def send(
    conv: Conversation,
    content: Any,
    params: dict[str, Any],
    *,
    key: str | None = None,
    retake: range | None = None,
) -> Message:
    """Send one user turn and return the stored reply (see the module docstring).

    ``retake``: regenerate instead; see :class:`Sending`.
    """
    sending = Sending(conv, content, params, key, retake=retake)
    if sending.answered is not None:
        return sending.answered
    started = time.monotonic()
    try:
        with conv.store.rate_limiter.slot(sending.window.estimated_tokens):
            try:
                response = sending.client.messages.create(
                    **sending.request, **sending.call_options()
                )
            except ValueError as exc:
                if not _needs_streaming(exc):
                    raise
                return _send_streamed(sending, started)
    except BaseException as exc:
        if sending.settled:
            raise
        latency = int((time.monotonic() - started) * 1000)
        sending.fail()
        if _is_sdk_failure(exc):
            error = wrap_api_error(exc, sending=sending)
            _log_call(conv, sending.window, outcome="error", latency_ms=latency, error=error)
            raise error from exc
        raise
    latency = int((time.monotonic() - started) * 1000)
    message = sending.finish(response, latency_ms=latency)
    _log_call(conv, sending.window, outcome="ok", latency_ms=latency, message=message)
    return message


def _send_streamed(sending: Sending, started: float) -> Message:
    """``send`` for a ``max_tokens`` the SDK only allows streamed: the same, minus the deltas."""
    with sending.client.messages.stream(**sending.request, **sending.call_options()) as stream:
        sending.heartbeat.watch(stream.close)
        reader = _Reader(stream)
        broken: BaseException | None = None
        try:
            reader.drain()
        except BaseException as exc:
            broken = _stream_failure(sending, exc)
        latency = int((time.monotonic() - started) * 1000)
        if broken is None and reader.stopped:
            message = sending.finish(
                stream.get_final_message(), latency_ms=latency, request_id=_request_id(stream)
            )
            _log_call(
                sending.conv, sending.window, outcome="ok", latency_ms=latency, message=message
            )
            return message
        message = sending.finish(reader.partial(), latency_ms=latency, status="incomplete")
        _log_call(
            sending.conv, sending.window, outcome="interrupted", latency_ms=latency, message=message
        )
        raise (broken or _cut(sending))


class ConversationStream:
    """A streamed reply: iterate it for text deltas; ``.message`` is the stored turn.

    Use it as a context manager (``with conv.stream("hi") as reply:``). When
    the block ends, the reply is stored: complete, or, if the stream broke
    off, ended without ``message_stop``, or the block was left early, as an
    ``incomplete`` turn with the text that arrived (a :class:`StreamInterrupted`
    error is raised for a broken or cut stream; an early exit or Ctrl-C is
    not turned into an error).
    """

    def __init__(
        self,
        conv: Conversation,
        content: Any,
        params: dict[str, Any],
        *,
        key: str | None = None,
        retake: range | None = None,
    ) -> None:
        self._conv = conv
        self._content = content
        self._params = params
        self._key = key
        self._retake = retake
        self._sending: Sending | None = None
        self._manager: Any = None
        self._stream: Any = None
        self._reader: _Reader | None = None
        self._started = 0.0
        self._limit: Any = None
        self._iteration = "not started"
        self.message: Message | None = None

    def __enter__(self) -> ConversationStream:
        store = self._conv.store
        self._sending = sending = Sending(
            self._conv, self._content, self._params, self._key, retake=self._retake
        )
        if sending.answered is not None:
            self.message = sending.answered  # this key's reply is stored: no call
            return self
        self._started = time.monotonic()
        try:
            self._limit = store.rate_limiter.slot(sending.window.estimated_tokens)
            self._limit.__enter__()
            try:
                self._manager = sending.client.messages.stream(
                    **sending.request, **sending.call_options()
                )
                self._stream = self._manager.__enter__()
                self._reader = _Reader(self._stream)
                sending.heartbeat.watch(self._stream.close)
            except BaseException as exc:
                self._limit.__exit__(type(exc), exc, exc.__traceback__)
                raise
        except BaseException as exc:
            sending.fail()
            if _is_sdk_failure(exc):
                raise wrap_api_error(exc, sending=sending) from exc
            raise
        return self

    def __iter__(self) -> Iterator[str]:
        """The reply's text, delta by delta, as it arrives."""
        assert self._sending is not None, "use the stream inside its `with` block"
        if self._sending.answered is not None:
            yield self._sending.answered.text
            return
        assert self._reader is not None
        self._iteration = "started"
        try:
            yield from self._reader.texts()
        except BaseException as exc:
            failure = _stream_failure(self._sending, exc)
            if failure is exc:
                raise
            raise failure from exc
        if not self._reader.stopped:
            raise _cut(self._sending)
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
        if sending.answered is not None:
            return
        assert self._reader is not None
        broken: BaseException | None = None
        if exc is None and self._iteration == "not started":
            try:
                self._reader.drain()  # the caller only wants the final message
                self._iteration = "done" if self._reader.stopped else "cut"
                if not self._reader.stopped:
                    broken = _cut(sending)
            except BaseException as failure:
                broken = _stream_failure(sending, failure)
        latency = int((time.monotonic() - self._started) * 1000)
        try:
            if exc is None and self._iteration == "done":
                final = self._stream.get_final_message()
                self.message = sending.finish(
                    final, latency_ms=latency, request_id=_request_id(self._stream)
                )
                outcome = "ok"
            else:
                # Broken off, cut, or left early: keep what arrived, visibly incomplete.
                self.message = sending.finish(
                    self._reader.partial(), latency_ms=latency, status="incomplete"
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
            raise broken
